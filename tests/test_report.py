"""The HTML run report: self-contained, deterministic, escaped; DVCLive history reading; a real-browser check."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest

from pipeline.publish.report import plot_group, read_curves, render_report

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")


def fake_inputs(steps: int = 30, num_pairs: int = 20) -> dict:
    """Inputs shaped like a real run's: train points every step, eval points every 10, 20 eval pairs."""
    curves: dict[str, list[tuple[int, float]]] = {}

    def series(name, fn, every=1):
        curves[name] = [(step, fn(step)) for step in range(every, steps + 1, every)]

    for split, every in (("train", 1), ("eval", 10)):
        series(f"{split}/loss", lambda s: 0.69 * math.exp(-s / 20) + 0.05, every)
        series(f"{split}/rewards/chosen", lambda s: 0.02 * s, every)
        series(f"{split}/rewards/rejected", lambda s: -0.03 * s, every)
        series(f"{split}/rewards/margins", lambda s: 0.05 * s, every)
        series(f"{split}/rewards/accuracies", lambda s: min(1.0, 0.5 + s / 50), every)
        series(f"{split}/logps/chosen", lambda s: -40 + 0.1 * s, every)
        series(f"{split}/logps/rejected", lambda s: -42 - 0.2 * s, every)
    series("train/learning_rate", lambda s: 5e-6 * (1 - s / steps))
    series("train/grad_norm", lambda s: 3.0 / (1 + s / 5))
    series("train/entropy", lambda s: 2.5 - s / 60)
    pairs = [
        {
            "row_id": f"eval-{i:04d}",
            "prompt": f"Write a review of film {i}.",
            "chosen": f"A wonderful film, number {i}.",
            "rejected": f"A dull film, number {i}.",
            "chosen_reward": 0.1 * i,
            "rejected_reward": -0.05 * i,
            "margin": 0.15 * i - 1.0,
        }
        for i in range(num_pairs)
    ]
    pairs[3]["prompt"] = "Tell me about <script>alert('x')</script> & friends " + "very long " * 100
    pairs[3]["margin"] = 10.0
    judged = {
        "win_rate": 0.8125,
        "policy_mean_score": 0.71,
        "reference_mean_score": 0.32,
        "num_generations": 16,
        "examples": [
            {
                "prompt": f"Review film {i}",
                "policy": "Loved it.\nTruly great.",
                "reference": "It was bad.",
                "outcome": 1.0 if i % 3 else 0.5,
            }
            for i in range(10)
        ],
    }
    eval_metrics = {
        "loss": 0.41,
        "rewards/accuracies": 0.9,
        "rewards/chosen": 0.55,
        "rewards/rejected": -0.8,
        "rewards/margins": 1.35,
        "logps/chosen": -38.123456,
        "num_tokens": 123456,
    }
    reference_metrics = {"loss": 0.6931471805599453, "rewards/accuracies": 0.5, "logps/chosen": -40.0}
    params = {
        "seed": 0,
        "model": {"name_or_path": "builtin:tiny-llama", "revision": None},
        "data": {"train": "builtin:sentiment", "eval": None},
        "train": {"beta": 0.1, "loss_type": ["sigmoid"], "learning_rate": 5e-6, "num_train_epochs": 1},
    }
    return {
        "title": "DPO run: builtin:tiny-llama on builtin:sentiment",
        "curves": curves,
        "eval_metrics": eval_metrics,
        "reference_metrics": reference_metrics,
        "generations": judged,
        "pairs": pairs,
        "params": params,
    }


@pytest.fixture(scope="module")
def inputs():
    return fake_inputs()


@pytest.fixture(scope="module")
def page(inputs):
    return render_report(**inputs)


def _table(page: str, table_id: str) -> str:
    match = re.search(rf'<table id="{table_id}".*?</table>', page, re.S)
    assert match, f"no table #{table_id}"
    return match.group(0)


def test_page_is_self_contained(page):
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page


def test_one_svg_per_plot_group(page):
    groups = re.findall(r'<figure class="plot" data-group="([^"]*)">', page)
    # rewards chosen/rejected/margins, train and eval, share one plot; so do logps chosen/rejected
    assert groups == ["loss", "rewards", "rewards/accuracies", "logps", "entropy", "grad_norm", "learning_rate"]
    assert page.count("<svg") == len(groups)
    rewards = re.search(r'data-group="rewards">(.*?)</figure>', page, re.S).group(1)
    for label in ("train chosen", "train rejected", "train margins", "eval chosen", "eval margins"):
        assert label in rewards


def test_plot_group_names():
    assert plot_group("train/rewards/margins") == plot_group("eval/rewards/chosen") == "rewards"
    assert plot_group("eval/logits/rejected") == "logits"
    assert plot_group("train/rewards/accuracies") == "rewards/accuracies"
    assert plot_group("train/loss") == plot_group("eval/loss") == "loss"


def test_no_curves_sentence(inputs):
    page = render_report(**{**inputs, "curves": {}})
    assert "No training curves were logged" in page and "<svg" not in page


def test_metrics_table(page):
    table = _table(page, "metrics")
    assert "<th>metric</th><th>policy</th><th>reference</th>" in table
    assert "<tr><th>loss</th><td>0.41</td><td>0.6931</td></tr>" in table
    assert "<tr><th>rewards/margins</th><td>1.35</td><td>–</td></tr>" in table
    assert "<tr><th>logps/chosen</th><td>-38.12</td><td>-40</td></tr>" in table
    assert table.split("<tbody>")[1].count("<tr>") == 7  # one row per name in either dict


def test_margin_tables(page, inputs):
    largest, smallest = _table(page, "pairs-largest"), _table(page, "pairs-smallest")
    assert re.findall(r"<tr><td title=\"(eval-\d+)\">", largest) == [
        "eval-0003",
        "eval-0019",
        "eval-0018",
        "eval-0017",
        "eval-0016",
    ]
    assert re.findall(r"<tr><td title=\"(eval-\d+)\">", smallest) == [
        "eval-0000",
        "eval-0001",
        "eval-0002",
        "eval-0004",
        "eval-0005",
    ]
    assert "A wonderful film, number 19." in largest and "A dull film, number 0." in smallest


def test_text_is_escaped_and_truncated(page):
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; friends" in page
    cell = re.search(r'<td class="text">(Tell me about.*?)</td>', page, re.S).group(1)
    assert cell.endswith("…") and len(cell) < 700


def test_win_rate_section(page, inputs):
    assert "81.2%" in page and 'id="generations"' in page
    assert page.count("Review film") == 8  # at most 8 examples
    without = render_report(**{**inputs, "generations": None, "curves": {}})  # no plots: a fast render
    section = re.search(r'<section id="generations">.*?</section>', without, re.S).group(0)
    assert "No generations" in section and "win rate" not in without.lower()


def _rows(table: str) -> dict[str, list[str]]:
    """A table's body rows: first cell -> the other cells."""
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1], re.S):
        cells = re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)
        rows[cells[0]] = cells[1:]
    return rows


def test_counts_are_shown_as_counts_not_metrics(inputs):
    metrics = {**inputs["eval_metrics"], "num_pairs": 200, "num_generations": 120}
    page = render_report(**{**inputs, "eval_metrics": metrics, "curves": {}})
    rows = _rows(_table(page, "metrics"))
    assert "num_pairs" not in rows and "num_generations" not in rows
    assert re.search(r'<p class="counts">[^<]*200 eval pairs', page)
    assert re.search(r'<p class="counts">[^<]*120 generations', page)


def test_judge_scores_sit_in_their_columns(inputs):
    metrics = {**inputs["eval_metrics"], "win_rate": 0.75, "policy_mean_score": 2.5, "reference_mean_score": -1.5}
    rows = _rows(_table(render_report(**{**inputs, "eval_metrics": metrics, "curves": {}}), "metrics"))
    assert "reference_mean_score" not in rows and "policy_mean_score" not in rows
    assert rows["judge score (mean)"] == ["2.5", "-1.5"]
    assert rows["win rate (ties half)"] == ["0.75", "0.25"]


def test_integer_params_print_as_integers(inputs):
    params = {
        **inputs["params"],
        "train": {
            **inputs["params"]["train"],
            "eval_steps": 50.0,
            "num_train_epochs": 2.0,
            "learning_rate": 3e-5,
            "beta": 0.1,
        },
    }
    page = render_report(**{**inputs, "params": params, "curves": {}})
    train = _table(page, "train-params")
    assert "<th>eval_steps</th><td>50</td>" in train and "<th>num_train_epochs</th><td>2</td>" in train
    assert "<th>beta</th><td>0.1</td>" in train and "<th>learning_rate</th><td>3.0e-05</td>" in train
    assert "eval_steps: 50\n" in page and "50.0" not in page


def test_examples_show_wins_ties_and_losses(inputs):
    examples = [
        {
            "prompt": f"Review film {i}",
            "policy": f"policy {i}",
            "reference": f"reference {i}",
            "outcome": 1.0 if i < 20 else 0.5 if i < 22 else 0.0,
        }
        for i in range(24)
    ]
    generations = {
        "win_rate": 0.875,
        "policy_mean_score": 1.0,
        "reference_mean_score": 0.0,
        "num_generations": 24,
        "examples": examples,
    }
    page = render_report(**{**inputs, "generations": generations, "curves": {}})
    table = _table(page, "generation-examples")
    outcomes = re.findall(r"<td>(policy wins|tie|reference wins)</td>", table)
    assert len(outcomes) == 8 and {"policy wins", "tie", "reference wins"} == set(outcomes)
    assert outcomes.count("tie") == 2 and outcomes.count("reference wins") == 2  # every tie and loss there is
    assert "8 of 24" in page


def test_generations_without_a_judge_say_so(inputs):
    examples = [
        {"prompt": f"Question {i}", "policy": f"policy answer {i}", "reference": f"reference answer {i}"}
        for i in range(12)
    ]
    page = render_report(**{**inputs, "generations": {"num_generations": 12, "examples": examples}, "curves": {}})
    section = re.search(r'<section id="generations">.*?</section>', page, re.S).group(0)
    assert "no judge" in section and "win rate" not in section
    assert section.count("policy answer") == 8 and "<th>outcome</th>" not in section


def test_params_shown(page):
    assert "builtin:tiny-llama" in _table(page, "sources")
    train = _table(page, "train-params")
    assert "<th>beta</th><td>0.1</td>" in train and "<th>loss_type</th><td>[sigmoid]</td>" in train
    assert "<details><summary>" in page


def test_deterministic(inputs, page):
    import matplotlib

    assert render_report(**inputs) == page
    ids = re.findall(r' id="([^"]*)"', page)
    assert len(ids) == len(set(ids))  # several inlined SVGs, no id twice
    assert matplotlib.rcParams["svg.hashsalt"] is None  # the caller's matplotlib settings are left alone


def _write_history(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_read_curves(tmp_path):
    metrics = tmp_path / "live" / "plots" / "metrics"
    _write_history(metrics / "train" / "rewards" / "chosen.tsv", ["step\tchosen", "2\t0.5", "4\t0.75"])
    _write_history(
        metrics / "eval" / "loss.tsv", ["timestamp\tstep\tloss", "1700000000000\t10\t0.6", "1700000000500\t20\t0.4"]
    )
    _write_history(metrics / "train" / "loss.tsv", ["step\tloss", "2\t0.7", "4\t0.6", "2\t0.65"])  # resumed run
    assert read_curves(tmp_path / "live") == {
        "eval/loss": [(10, 0.6), (20, 0.4)],
        "train/loss": [(2, 0.65), (4, 0.6)],
        "train/rewards/chosen": [(2, 0.5), (4, 0.75)],
    }
    assert read_curves(tmp_path / "missing") == {}
    _write_history(metrics / "bad.tsv", ["epoch\tbad", "1\t2"])
    with pytest.raises(ValueError, match="bad.tsv"):
        read_curves(tmp_path / "live")


def _load_check_script():
    """scripts/check_report.py as a module (registered first: its dataclasses look their module up)."""
    if "check_report" not in sys.modules:
        spec = importlib.util.spec_from_file_location("check_report", ROOT / "scripts" / "check_report.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["check_report"] = module
        spec.loader.exec_module(module)
    return sys.modules["check_report"]


def test_dom_check_flags_remote_resources():
    check = _load_check_script()
    parts = check.read_dom(
        '<html><head><link rel="stylesheet" href="https://cdn.example/x.css"></head><body>'
        '<figure class="plot" data-group="loss"><svg></svg></figure>'
        '<img src="//example.com/a.png"><div style="background:url(http://x/y.png)"></div>'
        '<table id="metrics"><tbody><tr><td>1</td></tr></tbody></table></body></html>'
    )
    assert parts.plots == [("loss", 1)] and parts.tables == {"metrics": 1}
    assert len(parts.remote_refs) == 3


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (Debian: apt-get install chromium)"
)
def test_report_in_headless_chromium(tmp_path, page):
    check = _load_check_script()
    report = tmp_path / "report.html"
    report.write_text(page, encoding="utf-8")
    result = check.check_report(report, screenshot=tmp_path / "report.png", expect_plots=7)
    print(result.summary())
    assert result.problems == []
    assert [group for group, _ in result.parts.plots][:2] == ["loss", "rewards"]
    assert result.parts.tables["pairs-largest"] == result.parts.tables["pairs-smallest"] == 5
    assert result.requests == []
    assert check.png_size(result.screenshot)[0] == 1280
