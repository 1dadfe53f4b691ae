"""The run report: one self-contained HTML page a person reads after a training run.

Everything is inline (CSS, plots as SVG), so the page opens offline and can be committed to git. The same inputs
give the same bytes (DVC hashes the page): no timestamps, no random ids, a fixed order wherever the inputs give none.
"""

from __future__ import annotations

import csv
import html
import io
import math
import numbers
import re
from pathlib import Path

import yaml

from pipeline.core.redaction import redact
from pipeline.judge.results import FIGURES
from pipeline.store.artifacts import write_text

TEXT_LIMIT = 600  # characters of prompt/completion text shown before an ellipsis
MAX_EXAMPLES = 8  # generations shown
DISAGREEMENTS_SHOWN = 5  # judged examples where the two answers are judged furthest apart
HARNESS = "lm_eval/"  # eval.json's lm-evaluation-harness figures: lm_eval/<policy|reference>/<task>/<metric>
PAIRS_SHOWN = 5  # pairs in each of the largest/smallest margin tables
OUTCOMES = {1.0: "policy wins", 0.5: "tie", 0.0: "reference wins"}  # the judge's outcome of one prompt
COUNTS = {"num_pairs": "eval pairs", "num_generations": "generations"}  # sizes of the evaluation, not metrics
JUDGE_ROWS = ("judge score (mean)", "win rate (ties half)")  # the judge's numbers, one column per side

_SPLITS = ("train", "eval")
_SIDES = ("chosen", "rejected", "margins")  # series sharing one plot, in legend order
_LEADING_GROUPS = ("loss", "rewards", "rewards/accuracies", "logps")  # then the rest alphabetically
_SIDE_COLORS = {"chosen": "#2a9d55", "rejected": "#d1495b", "margins": "#3465a4", None: "#3465a4"}
_SPLIT_SHADES = {"train": None, "eval": "#e08a00"}  # an un-split metric: train blue, eval orange

Curves = dict[str, list[tuple[int, float]]]


# ---------------------------------------------------------------------------------------------------------------
# Reading DVCLive's history


def read_curves(live_dir: Path) -> Curves:
    """DVCLive's history files `<live_dir>/plots/metrics/**/*.tsv` as {"train/rewards/chosen": [(step, value)]}.

    Points come sorted by step; a step logged twice (a resumed run) keeps its last value. Values that are not
    numbers (DVCLive also logs strings) are left out. A missing directory gives {}.
    """
    root = Path(live_dir) / "plots" / "metrics"
    if not root.is_dir():
        return {}
    curves: Curves = {}
    for path in sorted(root.rglob("*.tsv")):
        points = _read_history(path)
        if points:
            curves[path.relative_to(root).with_suffix("").as_posix()] = points
    return curves


def _read_history(path: Path) -> list[tuple[int, float]]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        columns = [c for c in (reader.fieldnames or []) if c not in ("step", "timestamp")]
        if "step" not in (reader.fieldnames or []) or len(columns) != 1:
            raise ValueError(
                f"{path}: expected a DVCLive history with a `step` column and one value column "
                f"(and optionally `timestamp`), got columns {reader.fieldnames}"
            )
        by_step: dict[int, float] = {}
        for row in reader:
            value = _as_float(row[columns[0]])
            if value is not None:
                by_step[int(float(row["step"]))] = value
    return sorted(by_step.items())


def _as_float(text: str | None) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Grouping curves into plots


def plot_group(name: str) -> str:
    """The plot a series belongs to: its name without the train/eval prefix and without a chosen/rejected/margins
    tail."""
    parts = name.split("/")
    if len(parts) > 1 and parts[0] in _SPLITS:
        parts = parts[1:]
    if len(parts) > 1 and parts[-1] in _SIDES:
        parts = parts[:-1]
    return "/".join(parts)


def group_curves(curves: Curves) -> list[tuple[str, list[str]]]:
    """[(group, [series names])], groups in the report's order, series in legend order (train before eval)."""
    groups: dict[str, list[str]] = {}
    for name in curves:
        groups.setdefault(plot_group(name), []).append(name)
    return [(group, sorted(groups[group], key=_series_order)) for group in sorted(groups, key=_group_order)]


def _group_order(group: str) -> tuple[int, str]:
    return (_LEADING_GROUPS.index(group), "") if group in _LEADING_GROUPS else (len(_LEADING_GROUPS), group)


def _series_order(name: str) -> tuple:
    split, side = _split_and_side(name)
    return (
        _SPLITS.index(split) if split in _SPLITS else len(_SPLITS),
        split or "",
        _SIDES.index(side) if side in _SIDES else -1,
        name,
    )


def _split_and_side(name: str) -> tuple[str | None, str | None]:
    parts = name.split("/")
    split = parts[0] if len(parts) > 1 and parts[0] in _SPLITS else None
    side = parts[-1] if len(parts) > 1 + (split is not None) and parts[-1] in _SIDES else None
    return split, side


# ---------------------------------------------------------------------------------------------------------------
# Plots: matplotlib's SVG backend, without pyplot (no global state touched for the caller)


def _plot_svg(group: str, names: list[str], curves: Curves, salt: str) -> str:
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    style = {
        "svg.hashsalt": salt,
        "svg.fonttype": "none",
        "font.size": 9,
        "axes.titlesize": 10,
        "axes.spines.top": False,
        "axes.spines.right": False,
    }
    with matplotlib.rc_context(style):
        figure = Figure(figsize=(5, 3))
        FigureCanvasSVG(figure)
        axes = figure.add_subplot()
        for name in names:
            split, side = _split_and_side(name)
            points = sorted(curves[name])
            steps = [step for step, _ in points]
            values = [value for _, value in points]
            color = _SIDE_COLORS[side] if side else (_SPLIT_SHADES.get(split) or _SIDE_COLORS[None])
            label = " ".join(part for part in (split, side) if part) or name
            if split == "eval":
                axes.plot(
                    steps, values, color=color, marker="o", markersize=4, linestyle=":", linewidth=0.8, label=label
                )
            else:
                axes.plot(steps, values, color=color, linewidth=1.4, label=label)
        axes.set_title(group)
        axes.set_xlabel("step")
        axes.grid(True, color="#e6e6e6", linewidth=0.6)
        if len(names) > 1:
            # outside the axes: a legend inside would hide the curves it explains
            axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
        figure.tight_layout()
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    return _inline_svg(buffer.getvalue())


def _inline_svg(document: str) -> str:
    """An SVG document as an element to inline: no XML prolog/DOCTYPE/metadata, no unreferenced group ids
    (matplotlib numbers them per figure, so two plots on one page would repeat them)."""
    svg = document[document.index("<svg") :]
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, flags=re.S)
    return re.sub(r'<g id="[^"]*"', "<g", svg).strip()


# ---------------------------------------------------------------------------------------------------------------
# Text and numbers


def _text(value) -> str:
    """Plain text for a cell: truncated at TEXT_LIMIT characters, HTML-escaped."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > TEXT_LIMIT:
        text = text[:TEXT_LIMIT].rstrip() + " …"
    return html.escape(text)


def _pictures(uris: list | None) -> str:
    """A prompt's images, inline (`data:image/...` URIs only: the page stays self-contained)."""
    return "".join(
        f'<img class="picture" alt="prompt image" src="{html.escape(uri, quote=True)}">'
        for uri in uris or []
        if isinstance(uri, str) and uri.startswith("data:image/")
    )


def format_number(value) -> str:
    """4 significant digits; integers and large values as whole numbers; anything else as text."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return html.escape(str(value))
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    value = float(value) + 0.0  # -0.0 reads as 0
    if math.isfinite(value) and abs(value) >= 1e4:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _e(value) -> str:
    return html.escape(str(value))


# ---------------------------------------------------------------------------------------------------------------
# Sections


def _curves_section(curves: Curves) -> str:
    if not curves:
        return (
            '<section id="curves"><h2>Training curves</h2>'
            '<p class="empty">No training curves were logged.</p></section>'
        )
    figures = []
    for index, (group, names) in enumerate(group_curves(curves)):
        svg = _plot_svg(group, names, curves, salt=f"dpo-report-{index}")
        figures.append(f'<figure class="plot" data-group="{_e(group)}">{svg}</figure>')
    return (
        '<section id="curves"><h2>Training curves</h2>'
        '<p class="note">Lines: train; markers: eval.</p>'
        f'<div class="plots">{"".join(figures)}</div></section>'
    )


def metric_rows(eval_metrics: dict, reference_metrics: dict) -> list[tuple[str, object, object]]:
    """(name, policy value, reference value) rows of the policy-vs-reference table, None where a side has no value.

    Counts (COUNTS) are no rows, nor are the judge's other figures (the generations section shows them) and the
    harness's (its own table); the judge's mean scores and win rate become JUDGE_ROWS, each side in its column: the
    reference's win rate over the policy is 1 − win_rate (ties count half to each)."""
    names = sorted(
        {n for n in set(eval_metrics) | set(reference_metrics) if not n.startswith(HARNESS)}
        - set(COUNTS)
        - set(FIGURES),
        key=lambda n: (_group_order(plot_group(n)), _series_order(n)),
    )
    rows = [(name, eval_metrics.get(name), reference_metrics.get(name)) for name in names]
    if "policy_mean_score" in eval_metrics or "reference_mean_score" in eval_metrics:
        rows.append((JUDGE_ROWS[0], eval_metrics.get("policy_mean_score"), eval_metrics.get("reference_mean_score")))
    if "win_rate" in eval_metrics:
        rows.append((JUDGE_ROWS[1], eval_metrics["win_rate"], 1.0 - eval_metrics["win_rate"]))
    return rows


def _counts(eval_metrics: dict) -> str:
    parts = [f"{format_number(eval_metrics[key])} {label}" for key, label in COUNTS.items() if key in eval_metrics]
    return f'<p class="counts">On {", ".join(parts)}.</p>' if parts else ""


def _metrics_section(eval_metrics: dict[str, float], reference_metrics: dict[str, float]) -> str:
    rows = metric_rows(eval_metrics, reference_metrics)
    if not rows:
        return '<section id="eval"><h2>Evaluation</h2><p class="empty">No evaluation metrics.</p></section>'
    cells = "".join(
        f"<tr><th>{_e(name)}</th><td>{'–' if mine is None else format_number(mine)}</td>"
        f"<td>{'–' if theirs is None else format_number(theirs)}</td></tr>"
        for name, mine, theirs in rows
    )
    return (
        '<section id="eval"><h2>Evaluation: policy vs reference</h2>'
        + _counts(eval_metrics)
        + '<table id="metrics" class="numbers"><thead><tr><th>metric</th><th>policy</th><th>reference</th></tr>'
        f"</thead><tbody>{cells}</tbody></table>"
        '<p class="note">The reference is scored like the policy, against itself: its implicit rewards '
        "β·log(π_ref/π_ref) are 0 by definition, so its rewards/accuracies (chosen reward strictly above "
        "rejected) is 0 and its loss is the objective at zero rewards.</p></section>"
    )


def pick_examples(examples: list[dict], limit: int = MAX_EXAMPLES) -> list[dict]:
    """At most `limit` examples covering every outcome there is: taken in turn from policy wins, ties and reference
    wins (each in file order; examples without an outcome after them), shown grouped in that order."""
    groups = [[e for e in examples if e.get("outcome") == outcome] for outcome in OUTCOMES]
    groups.append([e for e in examples if e.get("outcome") not in OUTCOMES])
    taken = [0] * len(groups)
    while sum(taken) < min(limit, len(examples)):
        for i, group in enumerate(groups):
            if taken[i] < len(group) and sum(taken) < limit:
                taken[i] += 1
    return [e for group, n in zip(groups, taken) for e in group[:n]]


def _outcome_counts(examples: list[dict]) -> str:
    """ "6 policy wins, 1 tie, 1 reference win" of the examples shown."""
    names = {1.0: ("policy win", "policy wins"), 0.5: ("tie", "ties"), 0.0: ("reference win", "reference wins")}
    counts = [(sum(e.get("outcome") == o for e in examples), names[o]) for o in OUTCOMES]
    return ", ".join(f"{n} {one if n == 1 else many}" for n, (one, many) in counts if n)


def _verdict(generations: dict, count) -> str:
    """The win rate with its interval, the length-controlled rate, and the counts behind them."""
    low, high = generations.get("win_rate_low"), generations.get("win_rate_high")
    level = 100 * generations.get("confidence", 0.95)
    interval = (
        f" ({level:g}% interval {100 * low:.1f}–{100 * high:.1f}%)" if low is not None and high is not None else ""
    )
    controlled = generations.get("length_controlled_win_rate")
    scores = (
        f"; mean judge score: policy {format_number(generations['policy_mean_score'])}, "
        f"reference {format_number(generations['reference_mean_score'])}"
        if "policy_mean_score" in generations
        else ""
    )
    unparsed = generations.get("unparsed_verdicts", 0)
    return (
        f'<div class="win-rate"><span class="big">{100 * generations["win_rate"]:.1f}%</span> '
        f"<span>win rate of the policy over the reference{_e(interval)}, by the {_e(generations.get('judge', ''))} "
        f"judge on {_e(generations.get('num_comparisons', count))} comparisons over {_e(count)} held-out prompts"
        f"{scores}</span></div>"
        + (
            f'<p id="length-controlled">length-controlled win rate: <b>{100 * controlled:.1f}%</b> '
            "(the judge's verdict regressed on the answers' length difference, read at equal lengths: a policy "
            "that wins only by writing more falls toward 50%)</p>"
            if controlled is not None
            else ""
        )
        + (
            f'<p class="note" id="unparsed">{_e(unparsed)} comparisons had a reply that was no verdict and are '
            "left out of the win rate.</p>"
            if unparsed
            else ""
        )
    )


def _lengths_table(generations: dict) -> str:
    if "policy_mean_length" not in generations:
        return ""
    return (
        '<table id="lengths" class="numbers"><thead><tr><th></th><th>policy</th><th>reference</th></tr></thead>'
        f"<tbody><tr><th>mean answer length (tokens)</th><td>{format_number(generations['policy_mean_length'])}</td>"
        f"<td>{format_number(generations['reference_mean_length'])}</td></tr></tbody></table>"
    )


def _examples_table(table_id: str, examples: list[dict], judged: bool) -> str:
    rows = "".join(
        f'<tr><td class="text">{_pictures(ex.get("images"))}{_text(ex["prompt"])}</td>'
        f'<td class="text">{_text(ex["policy"])}</td>'
        f'<td class="text">{_text(ex["reference"])}</td>'
        + (f"<td>{_e(OUTCOMES.get(ex.get('outcome'), 'no verdict'))}{_scores(ex)}</td>" if judged else "")
        + "</tr>"
        for ex in examples
    )
    if not rows:
        return '<p class="empty">No examples.</p>'
    outcome_col, outcome_head = ('<col class="narrow">', "<th>outcome</th>") if judged else ("", "")
    return (
        f'<table id="{table_id}" class="texts"><colgroup><col><col><col>{outcome_col}</colgroup>'
        f"<thead><tr><th>prompt</th><th>policy</th><th>reference</th>{outcome_head}</tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def _scores(example: dict) -> str:
    if "policy_score" in example:
        return (
            f"<br><small>{format_number(example['policy_score'])} vs "
            f"{format_number(example['reference_score'])}</small>"
        )
    if example.get("replies"):
        return f"<br><small>replies: {_e(' / '.join(example['replies']))}</small>"
    return ""


def most_disagreeing(examples: list[dict], limit: int = DISAGREEMENTS_SHOWN) -> list[dict]:
    """The judged examples whose answers the judge set furthest apart (largest score gap, or a decisive pairwise
    verdict), ties of that in file order."""
    ranked = sorted(
        (e for e in examples if e.get("disagreement")), key=lambda e: -e["disagreement"]
    )  # sorted() is stable: file order within a gap
    return ranked[:limit]


def _generations_section(generations: dict | None) -> str:
    if generations is None:
        return (
            '<section id="generations"><h2>Generations</h2>'
            '<p class="empty">No generations (evaluate.num_generations is 0).</p></section>'
        )
    every = generations.get("examples", [])
    examples = pick_examples(every)
    judged = "win_rate" in generations or "unparsed_verdicts" in generations
    count = generations.get("num_generations", len(every))
    if "win_rate" in generations:
        verdict = _verdict(generations, count)
        shown = f"{len(examples)} of {len(every)}: {_outcome_counts(examples)}"
    elif judged:
        verdict = (
            f'<p class="note" id="unparsed">The judge gave no verdict on any of the {_e(len(every))} comparisons.</p>'
        )
        shown = f"{len(examples)} of {len(every)}"
    else:
        verdict = (
            f'<p class="note" id="no-judge">no judge (evaluate.judge: none): the answers of both to {_e(count)} '
            "held-out prompts, unscored; set evaluate.judge to reward_model or pairwise to judge them.</p>"
        )
        shown = f"{len(examples)} of {len(every)}"
    apart = most_disagreeing(every) if judged else []
    return (
        '<section id="generations"><h2>Generations: policy vs reference</h2>'
        f"{verdict}{_lengths_table(generations)}"
        + (
            f"<h3>Where the judge sets them furthest apart ({len(apart)})</h3>"
            + _examples_table("disagreements", apart, judged)
            if apart
            else ""
        )
        + f"<h3>Examples ({shown})</h3>{_examples_table('generation-examples', examples, judged)}</section>"
    )


def harness_rows(eval_metrics: dict) -> list[tuple[str, str, object, object, object, object]]:
    """(task, metric, policy, policy stderr, reference, reference stderr) of eval.json's lm_eval/ figures."""
    sides: dict[str, dict[str, float]] = {"policy": {}, "reference": {}}
    for name, value in eval_metrics.items():
        if name.startswith(HARNESS):
            side, _, rest = name[len(HARNESS) :].partition("/")
            sides.setdefault(side, {})[rest] = value
    rows = []
    for key in sorted(set(sides["policy"]) | set(sides["reference"])):
        if key.endswith("_stderr"):
            continue
        task, _, metric = key.rpartition("/")
        stderr = f"{task}/{metric}_stderr"
        rows.append(
            (
                task,
                metric,
                sides["policy"].get(key),
                sides["policy"].get(stderr),
                sides["reference"].get(key),
                sides["reference"].get(stderr),
            )
        )
    return rows


def _harness_section(eval_metrics: dict) -> str:
    rows = harness_rows(eval_metrics)
    if not rows:
        return ""

    def cell(value, stderr) -> str:
        if value is None:
            return "<td>–</td>"
        return f"<td>{format_number(value)}" + (f" ± {format_number(stderr)}" if stderr is not None else "") + "</td>"

    body = "".join(
        f"<tr><th>{_e(task)}</th><th>{_e(metric)}</th>{cell(p, ps)}{cell(r, rs)}</tr>"
        for task, metric, p, ps, r, rs in rows
    )
    return (
        '<section id="harness"><h2>General ability: lm-evaluation-harness</h2>'
        '<table id="harness-table" class="numbers"><thead><tr><th>task</th><th>metric</th><th>policy</th>'
        f"<th>reference</th></tr></thead><tbody>{body}</tbody></table>"
        '<p class="note">± the harness\'s own standard error. A policy well below its reference here lost general '
        "ability while it learned the preferences.</p></section>"
    )


def _pairs_section(pairs: list[dict]) -> str:
    if not pairs:
        return '<section id="pairs"><h2>Eval pairs</h2><p class="empty">No per-pair results.</p></section>'
    by_margin = sorted(pairs, key=lambda p: (p["margin"], p["row_id"]))
    largest = sorted(pairs, key=lambda p: (-p["margin"], p["row_id"]))[:PAIRS_SHOWN]
    return (
        '<section id="pairs"><h2>Eval pairs by implicit reward margin</h2>'
        f"<h3>Largest margins</h3>{_pairs_table('pairs-largest', largest)}"
        f"<h3>Smallest margins</h3>{_pairs_table('pairs-smallest', by_margin[:PAIRS_SHOWN])}</section>"
    )


def _pairs_table(table_id: str, pairs: list[dict]) -> str:
    rows = "".join(
        f'<tr><td title="{_e(p["row_id"])}">{_e(str(p["row_id"])[:10])}</td>'
        f'<td class="num">{format_number(p["margin"])}</td>'
        f'<td class="num">{format_number(p["chosen_reward"])}</td>'
        f'<td class="num">{format_number(p["rejected_reward"])}</td>'
        f'<td class="text">{_text(p["prompt"])}</td><td class="text">{_text(p["chosen"])}</td>'
        f'<td class="text">{_text(p["rejected"])}</td></tr>'
        for p in pairs
    )
    return (
        f'<table id="{table_id}" class="texts"><colgroup><col class="narrow"><col class="narrow"><col class="narrow">'
        '<col class="narrow"><col><col><col></colgroup>'
        "<thead><tr><th>row</th><th>margin</th><th>chosen reward</th><th>rejected reward</th><th>prompt</th>"
        f"<th>chosen</th><th>rejected</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _params_section(params: dict) -> str:
    model, data = params.get("model") or {}, params.get("data") or {}
    sources = [
        ("model", model.get("name_or_path")),
        ("model revision", model.get("revision")),
        ("reference model", model.get("ref_name_or_path")),
        ("adapter", model.get("adapter")),
        ("train data", data.get("train")),
        ("eval data", data.get("eval")),
        ("data subset", data.get("name")),
        ("split", data.get("split")),
    ]
    source_rows = "".join(
        f"<tr><th>{_e(label)}</th><td>{_e(value)}</td></tr>" for label, value in sources if value is not None
    )
    params = whole_numbers(params)
    train = _flatten(params.get("train") or {})
    train_rows = "".join(f"<tr><th>{_e(key)}</th><td>{_e(_yaml_scalar(value))}</td></tr>" for key, value in train)
    full = yaml.safe_dump(params, sort_keys=True, default_flow_style=False, allow_unicode=True)
    return (
        '<section id="params"><h2>Run parameters</h2><div class="param-tables">'
        f'<table id="sources" class="kv"><caption>sources</caption><tbody>{source_rows}</tbody></table>'
        f'<table id="train-params" class="kv"><caption>train</caption><tbody>{train_rows}</tbody></table></div>'
        f"<details><summary>all params (YAML)</summary><pre>{html.escape(full)}</pre></details></section>"
    )


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    items: list[tuple[str, object]] = []
    for key in sorted(tree, key=str):
        value = tree[key]
        if isinstance(value, dict) and value:
            items.extend(_flatten(value, f"{prefix}{key}."))
        else:
            items.append((f"{prefix}{key}", value))
    return items


def whole_numbers(value):
    """`value` with every whole float made an int, through dicts and lists: params.yaml's `eval_steps: 50` is read
    into a float field (50.0) and reads as 50 again."""
    if isinstance(value, dict):
        return {key: whole_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [whole_numbers(item) for item in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _yaml_scalar(value) -> str:
    """A value as it would read in params.yaml (null, true, [a, b])."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


# ---------------------------------------------------------------------------------------------------------------
# The page

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1200px;
padding:0 16px;color:#222;font-size:14px;line-height:1.4}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:12px}
figure.plot{margin:0;border:1px solid #eee;border-radius:4px;padding:4px;background:#fff}
figure.plot svg{display:block;width:100%;height:auto}
table{border-collapse:collapse;margin:6px 0}
th,td{border:1px solid #ddd;padding:4px 8px;vertical-align:top;text-align:left}
thead th{background:#f4f4f4}
table.numbers td,td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.texts{width:100%;table-layout:fixed}col.narrow{width:7em}
td.text{white-space:pre-wrap;overflow-wrap:anywhere;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
img.picture{display:block;width:64px;height:64px;image-rendering:pixelated;margin-bottom:4px;border:1px solid #ccc}
.win-rate{display:flex;align-items:baseline;gap:12px;background:#f3f8f3;border:1px solid #cfe3cf;border-radius:6px;
padding:10px 16px}
.win-rate .big{font-size:36px;font-weight:700;color:#2a7a3e}
.param-tables{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
table.kv caption{text-align:left;font-weight:600;padding:2px 0}table.kv th{font-weight:normal;color:#555}
table.kv td{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
pre{white-space:pre-wrap;background:#f8f8f8;padding:8px;font-size:12px}.empty,.note,.counts{color:#666}
"""


def render_report(
    *,
    title: str,
    curves: dict[str, list[tuple[int, float]]],
    eval_metrics: dict[str, float],
    reference_metrics: dict[str, float],
    generations: dict | None,
    pairs: list[dict],
    params: dict,
) -> str:
    """The run report as one self-contained HTML page (inline CSS and SVG, no scripts, nothing fetched)."""
    sections = [
        _generations_section(generations),
        _metrics_section(eval_metrics, reference_metrics),
        _harness_section(eval_metrics),
        _curves_section(curves),
        _pairs_section(pairs),
        _params_section(params),
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n"
        f"<body><h1>{_e(title)}</h1>\n" + "\n".join(s for s in sections if s) + "\n</body></html>\n"
    )


def write_report(path: Path, evaluation, live_dir: Path, params: dict) -> None:
    """Write the run report of an `Evaluation` (pipeline.run.evaluation) with the curves DVCLive logged in
    `live_dir`."""
    params = redact(params)  # the page records params: credentials masked, as in manifests
    title = f"DPO run: {params['model']['name_or_path']} on {params['data']['train']}"
    page = render_report(
        title=title,
        curves=read_curves(Path(live_dir)),
        eval_metrics=evaluation.metrics,
        reference_metrics=evaluation.reference_metrics,
        generations=evaluation.generations,
        pairs=evaluation.pairs,
        params=params,
    )
    write_text(Path(path), page)
