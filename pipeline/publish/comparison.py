"""Comparing runs: the few numbers that matter side by side, and every run's curves on one offline page.

A run is what `dpo compare` (stages/compare.py) gathers of a commit, an experiment or the workspace: its params, its
eval metrics, the environment it ran in (`pipeline.core.environment`) and its DVCLive curves. Everything here is pure:
same runs, same text, same bytes. The page is self-contained (inline CSS and SVG, no script, nothing fetched).
"""

from __future__ import annotations

import dataclasses
import html
import math
import numbers

KEY_METRICS = ("rewards/accuracies", "rewards/margins", "win_rate")  # the eval metrics a comparison shows
# the curves shown first (then the rest alphabetically)
LEADING_CURVES = (
    "eval/rewards/accuracies",
    "eval/rewards/margins",
    "eval/loss",
    "train/loss",
    "train/rewards/margins",
    "train/rewards/accuracies",
)
COLORS = ("#3465a4", "#d1495b", "#2a9d55", "#e08a00", "#7b4fa0", "#00a3a3", "#8c564b", "#c2185b")
MACHINE_KEYS = ("cpu", "cpu_flags", "threads", "processes", "gpu", "cuda", "torch", "transformers")

Curves = dict[str, list[tuple[int, float]]]


@dataclasses.dataclass
class Run:
    name: str  # "main", an experiment's name, "workspace"
    rev: str  # the commit (short), or "workspace"
    params: dict  # flat, "train.beta"
    metrics: dict  # flat eval metrics, "rewards/accuracies"
    environment: dict = dataclasses.field(default_factory=dict)
    curves: Curves = dataclasses.field(default_factory=dict)


def flat_params(tree: dict, prefix: str = "") -> dict:
    """params.yaml's nested keys as "train.beta"."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_params(runs: list[Run]) -> list[str]:
    """The params whose values differ between the runs, sorted."""
    keys = sorted({k for run in runs for k in run.params})
    return [k for k in keys if len({repr(run.params.get(k)) for run in runs}) > 1]


def machine(environment: dict) -> str:
    """One line naming a machine (the keys of MACHINE_KEYS it records)."""
    if not environment:
        return "not recorded"
    return ", ".join(f"{k} {environment[k]}" for k in MACHINE_KEYS if k in environment)


def machine_labels(runs: list[Run]) -> dict[str, str]:
    """{machine line: "A", "B", ...} in the order the runs first show each machine."""
    labels: dict[str, str] = {}
    for run in runs:
        labels.setdefault(machine(run.environment), chr(ord("A") + len(labels)) if len(labels) < 26 else "?")
    return labels


def machine_warning(runs: list[Run]) -> str | None:
    """A sentence when the runs come from more than one machine (or one did not record its machine), else None."""
    labels = machine_labels(runs)
    if len(labels) < 2 and "not recorded" not in labels:
        return None
    return (
        "These runs were not all made on one machine (or a run did not record where it ran): their differences "
        "mix the machine with the change. Run the baseline on this machine (`dvc repro`, commit) and the "
        "experiments after it, or `dvc pull` one shared baseline, before comparing."
    )


def dedupe_workspace(runs: list[Run]) -> list[Run]:
    """The runs without the workspace when it holds the same params, metrics and environment as another run (after
    `dvc exp run` the workspace holds the last experiment's results)."""

    def same(a: Run, b: Run) -> bool:
        return (a.params, a.metrics, a.environment) == (b.params, b.metrics, b.environment)

    return [r for r in runs if r.rev != "workspace" or not any(same(r, o) for o in runs if o is not r)]


def format_value(value) -> str:
    """4 significant digits for a float, a list as [a, b], anything else as text; a missing value as "-"."""
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or isinstance(value, numbers.Integral):
        return str(value)
    return f"{float(value) + 0.0:.4g}"


def table_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the comparison: run, rev, the changed params, KEY_METRICS, machine (when they differ)."""
    params, labels = changed_params(runs), machine_labels(runs)
    header = ["run", "rev", *params, *KEY_METRICS] + (["machine"] if len(labels) > 1 else [])
    rows = [
        [
            run.name,
            run.rev[:7],
            *(format_value(run.params.get(k)) for k in params),
            *(format_value(run.metrics.get(k)) for k in KEY_METRICS),
        ]
        + ([labels[machine(run.environment)]] if len(labels) > 1 else [])
        for run in runs
    ]
    return header, rows


def comparison_text(runs: list[Run]) -> str:
    """The comparison as a plain-text table (every column whole), the machines, and the warning when they differ."""
    header, rows = table_rows(runs)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    lines = [line(header), line("-" * w for w in widths), *(line(row) for row in rows)]
    labels = machine_labels(runs)
    lines.append("")
    lines += (
        [f"machine {label}: {name}" for name, label in labels.items()]
        if len(labels) > 1
        else [f"machine: {next(iter(labels), 'not recorded')}"]
    )
    warning = machine_warning(runs)
    if warning:
        lines += ["", f"warning: {warning}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# The page: one inline SVG per curve, a line per run


def curve_order(names) -> list[str]:
    return sorted(names, key=lambda n: (LEADING_CURVES.index(n) if n in LEADING_CURVES else len(LEADING_CURVES), n))


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if not high > low:
        return [low]
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9)
    return [round(i * step, 12) for i in range(first, math.floor(high / step + 1e-9) + 1)]


def _span(values: list[float], pad: float) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high == low:
        return low - 1, high + 1
    margin = (high - low) * pad
    return low - margin, high + margin


def curve_svg(
    title: str,
    series: list[tuple[int, list[tuple[int, float]]]],
    width: int = 480,
    height: int = 260,
    x_label: str = "step",
) -> str:
    """An inline SVG plot of one curve: `series` is (run index, points) per run that logged it; run i is drawn
    in COLORS[i] (dashed after the palette's length); the x axis is `x_label`."""
    left, right, top, bottom = 58, 12, 22, 34
    points = [(s, v) for _, pts in series for s, v in pts]
    x0, x1 = _span([s for s, _ in points], 0.0)
    y0, y1 = _span([v for _, v in points], 0.05)
    sx = lambda s: left + (s - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda v: height - bottom - (v - y0) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    parts = [
        f'<svg viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{html.escape(title)}" font-family="sans-serif" font-size="10">',
        f'<text x="{width / 2:.1f}" y="14" text-anchor="middle" font-size="12">{html.escape(title)}</text>',
    ]
    for tick in nice_ticks(y0, y1):
        y = sy(tick)
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e6e6e6"/>'
            f'<text x="{left - 4}" y="{y + 3:.1f}" text-anchor="end">{tick:.4g}</text>'
        )
    for tick in nice_ticks(x0, x1):
        x = sx(tick)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{height - bottom}" stroke="#f0f0f0"/>'
            f'<text x="{x:.1f}" y="{height - bottom + 13}" text-anchor="middle">{tick:.4g}</text>'
        )
    parts.append(
        f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
        'fill="none" stroke="#999"/>'
        f'<text x="{(left + width - right) / 2:.1f}" y="{height - 4}" '
        f'text-anchor="middle">{html.escape(x_label)}</text>'
    )
    for index, pts in series:
        color = COLORS[index % len(COLORS)]
        dash = ' stroke-dasharray="5 3"' if index >= len(COLORS) else ""
        coords = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in pts)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"{dash}/>')
        if len(pts) <= 25:
            parts += [f'<circle cx="{sx(s):.1f}" cy="{sy(v):.1f}" r="2.5" fill="{color}"/>' for s, v in pts]
    parts.append("</svg>")
    return "".join(parts)


def finite_points(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    return sorted((s, v) for s, v in points if math.isfinite(v))


def _legend(runs: list[Run]) -> str:
    keys = "".join(
        f'<span class="key"><span class="swatch" style="border-color:{COLORS[i % len(COLORS)]};'
        f'border-top-style:{"dashed" if i >= len(COLORS) else "solid"}"></span>{html.escape(run.name)}'
        "</span>"
        for i, run in enumerate(runs)
    )
    return f'<p class="legend">{keys}</p>'


def _table_html(runs: list[Run]) -> str:
    header, rows = table_rows(runs)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    labels = machine_labels(runs)
    machines = "".join(
        f"<li>{html.escape(label if len(labels) > 1 else 'machine')}: {html.escape(name)}</li>"
        for name, label in labels.items()
    )
    warning = machine_warning(runs)
    return (
        f'<table id="runs"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        f'<ul class="machines">{machines}</ul>' + (f'<p class="warning">{html.escape(warning)}</p>' if warning else "")
    )


PAGE_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1200px;
padding:0 16px;color:#222;font-size:14px;line-height:1.4}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse}th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;white-space:nowrap}
thead th{background:#f4f4f4}.warning{background:#fff4e0;border:1px solid #f0c080;padding:8px 12px;border-radius:4px}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(380px,1fr));gap:12px}
figure.plot{margin:0;border:1px solid #eee;border-radius:4px;padding:4px}
figure.plot svg{display:block;width:100%;height:auto}
.legend .key{margin-right:16px;white-space:nowrap}
.swatch{display:inline-block;width:22px;height:0;border-top:3px solid;vertical-align:middle;margin-right:6px}
.empty{color:#666}
"""


def render_comparison(runs: list[Run], title: str = "DPO runs compared") -> str:
    """The comparison page: the table, the machines, and one plot per curve with a line per run that logged it."""
    names = curve_order({name for run in runs for name in run.curves})
    figures = []
    for name in names:
        series = [(i, finite_points(run.curves[name])) for i, run in enumerate(runs) if name in run.curves]
        series = [(i, pts) for i, pts in series if pts]
        if series:
            figures.append(f'<figure class="plot" data-group="{html.escape(name)}">{curve_svg(name, series)}</figure>')
    curves = (
        _legend(runs) + f'<div class="plots">{"".join(figures)}</div>'
        if figures
        else '<p class="empty">No training curves were logged.</p>'
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{PAGE_CSS}</style></head>\n"
        f'<body><h1>{html.escape(title)}</h1>\n<section id="table"><h2>Runs</h2>{_table_html(runs)}</section>\n'
        f'<section id="curves"><h2>Curves</h2>{curves}</section>\n</body></html>\n'
    )
