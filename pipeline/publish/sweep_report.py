"""A sweep at a glance: one line per run in the terminal, and a self-contained HTML page with every run's curves on
shared axes (the comparison page's plotting), each run's state (live, stopped and where, finished) and lineage.

Pure functions of the sweep's state and the runs' DVCLive curves: the same state gives the same text and bytes.
"""

from __future__ import annotations

import html

from pipeline.publish.comparison import COLORS, PAGE_CSS, Curves, curve_order, curve_svg, finite_points
from pipeline.run.sweep_state import STOPPED, Run, SweepState

SHOWN_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "win_rate")  # columns, when any run has them


def settings_text(run: Run) -> str:
    return ", ".join(f"{key}={value}" for key, value in run.overrides.items())


def state_text(run: Run) -> str:
    """`live`, `finished`, or `stopped at chunk 1 (rule)`."""
    if run.state == STOPPED and run.stopped:
        return f"stopped at chunk {run.stopped['chunk']} ({run.stopped['by']})"
    return run.state


def lineage_text(run: Run) -> str:
    if run.start is None:
        return ""
    return f"{run.start['mode']} of {run.start['parent']} at chunk {run.start['chunk']}"


def metric_columns(state: SweepState) -> list[str]:
    present = {name for run in state.runs.values() for name in run.metrics}
    return [name for name in SHOWN_METRICS if name in present]


def _number(value) -> str:
    return "" if value is None else f"{value:.4g}"


def table(state: SweepState, metric: str) -> tuple[list[str], list[list[str]]]:
    """The runs as rows: name, state, chunks trained, step, the eval metrics of their last boundary (the ranking
    metric first), settings, lineage."""
    columns = metric_columns(state)
    columns = [metric] + [c for c in columns if c != metric] if metric in columns else columns
    header = ["run", "state", "chunks", "step", *columns, "settings", "lineage"]
    rows = [
        [
            run.name,
            state_text(run),
            f"{run.chunks_done}/{state.chunks}",
            f"{run.step}/{run.total_steps}",
            *(_number(run.metrics.get(c)) for c in columns),
            settings_text(run),
            lineage_text(run),
        ]
        for run in state.runs.values()
    ]
    return header, rows


def progress_text(state: SweepState, metric: str) -> str:
    """The table as aligned text, one line per run."""
    header, rows = table(state, metric)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]
    )


def render_sweep(state: SweepState, curves: dict[str, Curves], metric: str) -> str:
    """The sweep page: the runs' table (with why each stopped run stopped), then one plot per curve with a line per
    run (in the table's colours)."""
    runs = list(state.runs.values())
    header, rows = table(state, metric)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["", *header])
    body = "".join(
        "<tr>"
        + f'<td><span class="swatch" style="border-color:{COLORS[i % len(COLORS)]};'
        + f'border-top-style:{"dashed" if i >= len(COLORS) else "solid"}"></span></td>'
        + "".join(f"<td>{html.escape(cell)}</td>" for cell in row)
        + "</tr>"
        for i, row in enumerate(rows)
    )
    why = "".join(
        f"<li>{html.escape(run.name)}: {html.escape(run.stopped['why'])}</li>"
        for run in runs
        if run.state == STOPPED and run.stopped
    )
    figures = []
    for name in curve_order({n for c in curves.values() for n in c}):
        series = [(i, finite_points(curves.get(run.name, {}).get(name, []))) for i, run in enumerate(runs)]
        series = [(i, points) for i, points in series if points]
        if series:
            figures.append(f'<figure class="plot" data-group="{html.escape(name)}">{curve_svg(name, series)}</figure>')
    plots = f'<div class="plots">{"".join(figures)}</div>' if figures else '<p class="empty">No curves yet.</p>'
    title = f"Sweep {state.name}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{PAGE_CSS}</style></head>\n"
        f"<body><h1>{html.escape(title)}</h1>\n"
        f"<p>{state.chunks} chunks per run; ranked by {html.escape(metric)} at each rung.</p>\n"
        f'<section id="runs"><h2>Runs</h2><table id="sweep"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
        f"</table>{f'<ul class=stopped>{why}</ul>' if why else ''}</section>\n"
        f'<section id="curves"><h2>Curves</h2>{plots}</section>\n</body></html>\n'
    )
