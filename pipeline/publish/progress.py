"""Progress across iterative rounds (`dpo progress`): each round's eval figures in one table, a TSV that `dvc plots`
draws against the round, and a self-contained HTML page with the same plots.

Each round's evaluate judges the policy against its reference and, with --versus, against one more model
(`pipeline.run.evaluation.versus_figures`): with iterate.reference previous the reference is the round before and
the versus model the initial one; with initial, the other way round. This module names them `initial` and
`previous` whichever way they were measured.
"""

from __future__ import annotations

import html

from pipeline.publish.comparison import COLORS, PAGE_CSS, curve_svg, finite_points

SIDES = ("initial", "previous")
COLUMNS = (
    "round",
    "name",
    "win_rate_initial",
    "win_rate_initial_low",
    "win_rate_initial_high",
    "win_rate_previous",
    "win_rate_previous_low",
    "win_rate_previous_high",
    "reward_accuracy",
    "eval_loss",
)
PLOTS = {  # plot title → the columns drawn, each a line
    "judged win rate over the initial model": ("win_rate_initial", "win_rate_initial_low", "win_rate_initial_high"),
    "judged win rate over the previous round": ("win_rate_previous", "win_rate_previous_low", "win_rate_previous_high"),
    "reward accuracy on the held-out pairs": ("reward_accuracy",),
}


def round_row(number: int, name: str, metrics: dict, reference: str) -> dict:
    """One round's row from its flat eval metrics; `reference` is iterate.reference (which side `versus/` is)."""
    prefixes = (
        {"previous": "", "initial": "versus/"} if reference == "previous" else {"initial": "", "previous": "versus/"}
    )
    row: dict = {"round": number, "name": name}
    for side in SIDES:
        for suffix in ("", "_low", "_high"):
            row[f"win_rate_{side}{suffix}"] = metrics.get(f"{prefixes[side]}win_rate{suffix}")
    row["reward_accuracy"] = metrics.get("rewards/accuracies")
    row["eval_loss"] = metrics.get("loss")
    return row


def progress_tsv(rows: list[dict]) -> str:
    lines = ["\t".join(COLUMNS)]
    lines += ["\t".join("" if row[c] is None else str(row[c]) for c in COLUMNS) for row in rows]
    return "\n".join(lines) + "\n"


def progress_metrics(rows: list[dict]) -> dict:
    """results/progress.json: round name → its figures (what `dvc metrics show` lists)."""
    return {row["name"]: {c: row[c] for c in COLUMNS[2:] if row[c] is not None} for row in rows}


def _number(value) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def render_progress(rows: list[dict], title: str = "Iterative DPO: progress across rounds") -> str:
    figures = []
    for plot, columns in PLOTS.items():
        series = [
            (i, finite_points([(row["round"], row[c]) for row in rows if row[c] is not None]))
            for i, c in enumerate(columns)
        ]
        series = [(i, pts) for i, pts in series if pts]
        if series:
            figures.append(f'<figure class="plot">{curve_svg(plot, series, x_label="round")}</figure>')
    keys = "".join(
        f'<span class="key"><span class="swatch" style="border-color:{COLORS[i]}"></span>{label}</span>'
        for i, label in enumerate(("the figure", "interval low", "interval high"))
    )
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_number(row[c]))}</td>" for c in COLUMNS) + "</tr>" for row in rows
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{PAGE_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        "<p>Each round's policy judged against the initial model and against the round before (win rate with its "
        "bootstrap interval), and its reward accuracy on the original held-out pairs.</p>"
        f'<table id="rounds"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        f'<h2>Against the round</h2><p class="legend">{keys}</p><div class="plots">{"".join(figures)}</div>'
        "</body></html>\n"
    )
