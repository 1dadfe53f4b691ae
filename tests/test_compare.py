"""Where a run ran is recorded (manifests, results/eval.json), and runs compare: `dpo compare`'s table and its
self-contained curves page (opened in headless Chromium when it is installed). The comparison on real DVC
experiments is in tests/test_dvc_pipeline.py."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.core.environment import cpu_flags, cpu_model, describe, environment
from pipeline.publish.comparison import Run, comparison_text, dedupe_workspace, nice_ticks, render_comparison
from pipeline.publish.metrics_file import read_environment, read_metrics, write_metrics
from pipeline.store.artifacts import write_manifest
from stages.cli import STAGE_MODULES, main
from stages.compare import runs_of

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx2 fma avx512f avx512_bf16 amx_tile sse4_1 ht avx
cpu MHz\t\t: 2000.123

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
cpu MHz\t\t: 1999.871
"""


def test_the_environment_record_is_pure_and_names_only_what_stays_put():
    facts = dict(
        machine="x86_64",
        python="3.11.7",
        torch_version="2.6.0+cu124",
        transformers_version="4.57.0",
        cuda="12.4",
        cpu_capability="AVX512",
        threads=8,
        processes=1,
        gpus=["NVIDIA H200"],
    )
    record = describe(CPUINFO, **facts)
    assert record == describe(CPUINFO, **facts)
    assert record["cpu"] == "Intel(R) Xeon(R) Platinum 8480+" and record["gpu"] == "NVIDIA H200"
    assert record["cpu_flags"] == "amx_tile avx avx2 avx512_bf16 avx512f fma sse4_1 sse4_2"  # no fpu, ht
    assert "2000" not in json.dumps(record)  # the clock speed moves; it is not recorded
    assert cpu_model("", fallback="arm64") == "arm64" and cpu_flags("Features\t: fp asimd sve") == "asimd sve"
    here = environment()
    assert here == environment()
    assert {"cpu", "cpu_flags", "threads", "gpu", "cuda", "torch", "transformers"} <= set(here)
    text = json.dumps(here)
    assert socket.gethostname() not in text and f'"processes": {os.getpid()}' not in text


def test_manifests_and_eval_json_record_where_the_run_ran(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    assert write_manifest(tmp_path, "normalize", {}, {"seed": 1})["environment"] == environment()
    assert json.loads((tmp_path / "manifest.json").read_text())["environment"] == environment()
    metrics = tmp_path / "eval.json"
    write_metrics(metrics, {"rewards/accuracies": 0.75, "win_rate": 0.5}, environment())
    first = metrics.read_bytes()
    write_metrics(metrics, {"rewards/accuracies": 0.75, "win_rate": 0.5}, environment())
    assert metrics.read_bytes() == first  # same machine, same run: same bytes
    assert json.loads(first)["environment"] == read_environment(metrics) == environment()
    assert read_metrics(metrics) == {"rewards/accuracies": 0.75, "win_rate": 0.5}  # the record is not a metric


def runs(second_machine: bool = False) -> list[Run]:
    env = describe(
        CPUINFO,
        machine="x86_64",
        python="3.11",
        torch_version="2.6.0",
        transformers_version="4.57",
        cuda=None,
        cpu_capability="AVX2",
        threads=2,
        processes=1,
        gpus=[],
    )
    other = {**env, "cpu": "AMD EPYC 9654"} if second_machine else env
    params = {"seed": 42, "train.beta": 0.1, "train.loss_type": ["sigmoid"], "train.learning_rate": 5e-6}
    steps = range(2, 21, 2)
    curves = lambda scale: {
        "train/loss": [(s, 0.69 - scale * s / 100) for s in steps],  # noqa: E731
        "eval/rewards/accuracies": [(10, 0.6 * scale), (20, 0.8 * scale)],
        "train/rewards/margins": [(s, scale * s / 10) for s in steps],
    }
    return [
        Run(
            "main",
            "a" * 40,
            params,
            {"rewards/accuracies": 0.9, "rewards/margins": 0.5, "win_rate": 0.75, "loss": 0.4},
            env,
            curves(1.0),
        ),
        Run(
            "tense-beta",
            "b" * 40,
            {**params, "train.beta": 0.2},
            {"rewards/accuracies": 0.95, "rewards/margins": 0.81234567, "win_rate": 0.8},
            other,
            curves(1.1),
        ),
        Run(
            "<ipo>",
            "c" * 40,
            {**params, "train.loss_type": ["ipo"]},
            {"rewards/accuracies": 0.85},
            env,
            {"train/loss": [(s, 0.5) for s in steps], "eval/rewards/accuracies": [(20, float("nan"))]},
        ),
    ]


def test_the_comparison_shows_the_changed_params_and_the_metrics_that_matter():
    text = comparison_text(runs())
    header, rule, *rows = text.splitlines()[:5]
    assert header.split() == [
        "run",
        "rev",
        "train.beta",
        "train.loss_type",
        "rewards/accuracies",
        "rewards/margins",
        "win_rate",
    ]
    assert "seed" not in header and "learning_rate" not in header and "loss " not in header  # unchanged, not shown
    assert rows[1].split() == ["tense-beta", "bbbbbbb", "0.2", "[sigmoid]", "0.95", "0.8123", "0.8"]
    assert rows[2].split()[-3:] == ["0.85", "-", "-"]  # a missing metric reads "-"
    assert "warning" not in text and "machine: cpu Intel(R) Xeon(R) Platinum 8480+" in text


def test_runs_from_two_machines_are_flagged():
    text = comparison_text(runs(second_machine=True))
    assert text.splitlines()[0].split()[-1] == "machine"
    assert [row.split()[-1] for row in text.splitlines()[2:5]] == ["A", "B", "A"]
    assert "machine B: cpu AMD EPYC 9654" in text
    assert "warning: These runs were not all made on one machine" in text and "dvc repro" in text
    unrecorded = [runs()[0], Run("old", "d" * 40, {}, {"win_rate": 0.5})]
    assert "machine B: not recorded" in comparison_text(unrecorded) and "warning" in comparison_text(unrecorded)


def test_a_workspace_that_repeats_a_run_is_left_out():
    main, exp, _ = runs()
    workspace = Run("workspace", "workspace", exp.params, exp.metrics, exp.environment)
    assert [r.name for r in dedupe_workspace([workspace, main, exp])] == ["main", "tense-beta"]
    for changed in (
        Run("workspace", "workspace", exp.params, {"win_rate": 0.1}, exp.environment),
        Run("workspace", "workspace", exp.params, exp.metrics, {"cpu": "elsewhere"}),
    ):
        assert [r.name for r in dedupe_workspace([changed, main, exp])] == ["workspace", "main", "tense-beta"]


def exp_show_row(rev: str, name: str | None, beta: float, cpu: str, experiments=None) -> dict:
    """A row of `dvc exp show --json` as DVC 3 writes it."""
    eval_json = {"rewards": {"accuracies": 0.9, "margins": beta * 3}, "environment": {"cpu": cpu, "threads": 2}}
    data = {
        "rev": rev,
        "params": {"params.yaml": {"data": {"seed": 42, "train": {"beta": beta}}}},
        "metrics": {"results/eval.json": {"data": eval_json}, "dvclive/metrics.json": {"data": {"step": 4}}},
    }
    return {"rev": rev, "name": name, "data": data, "error": None, "experiments": experiments}


def test_runs_are_read_from_dvc_exp_show():
    experiment = exp_show_row("e" * 40, "tense-beta", 0.2, "Xeon")
    queued = {"rev": "f" * 40, "name": "queued", "data": None, "error": None, "experiments": None}
    rows = [
        exp_show_row("workspace", None, 0.2, "Xeon"),
        exp_show_row(
            "a" * 40,
            "main",
            0.1,
            "Xeon",
            [{"revs": [experiment], "name": "tense-beta"}, {"revs": [queued], "name": "queued"}],
        ),
    ]
    runs = runs_of(rows, "params.yaml", "results/eval.json")
    # the workspace repeats the experiment; the queued one has no results
    assert [(r.name, r.params["train.beta"]) for r in runs] == [("main", 0.1), ("tense-beta", 0.2)]
    assert runs[1].metrics == {"rewards/accuracies": 0.9, "rewards/margins": 0.6000000000000001}
    assert runs[1].environment == {"cpu": "Xeon", "threads": 2}
    assert [r.name for r in runs_of(rows, "params.yaml", "results/eval.json", ("main",))] == ["main"]
    assert [r.name for r in runs_of(rows, "params.yaml", "results/eval.json", ("eeee",))] == ["main", "tense-beta"]


def test_compare_is_a_command_but_not_a_stage():
    assert "compare" not in STAGE_MODULES  # dvc.yaml's stages are STAGE_MODULES
    result = CliRunner().invoke(main, ["compare", "--help"])
    assert result.exit_code == 0 and "--html" in result.output
    assert "compare" in CliRunner().invoke(main, ["--help"]).output


def test_nice_ticks():
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(2, 20) == [5, 10, 15, 20]
    assert nice_ticks(-0.013, 0.0021) == [-0.01, -0.005, 0.0]
    assert nice_ticks(3.0, 3.0) == [3.0]


@pytest.fixture(scope="module")
def page():
    return render_comparison(runs())


def test_the_curves_page_is_self_contained_and_deterministic(page):
    assert page == render_comparison(runs())
    assert not re.search(r"""(?:src|href|xmlns)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower() and "url(" not in page
    assert re.findall(r'<figure class="plot" data-group="([^"]*)">', page) == [
        "eval/rewards/accuracies",
        "train/loss",
        "train/rewards/margins",
    ]  # the leading curves first
    loss = re.search(r'data-group="train/loss">(.*?)</figure>', page, re.S).group(1)
    assert loss.count("<polyline") == 3  # one line per run
    accuracies = re.search(r'data-group="eval/rewards/accuracies">(.*?)</figure>', page, re.S).group(1)
    assert accuracies.count("<polyline") == 2 and "nan" not in accuracies  # a NaN point is left out
    assert "&lt;ipo&gt;" in page and "<ipo>" not in page
    assert '<table id="runs">' in page
    assert "No training curves were logged" in render_comparison([Run("main", "a" * 40, {}, {})])


def _load_check_script():
    if "check_report" not in sys.modules:
        spec = importlib.util.spec_from_file_location("check_report", ROOT / "scripts" / "check_report.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["check_report"] = module
        spec.loader.exec_module(module)
    return sys.modules["check_report"]


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (Debian: apt-get install chromium)"
)
def test_the_curves_page_in_headless_chromium_makes_no_request(tmp_path, page):
    check = _load_check_script()
    path = tmp_path / "compare.html"
    path.write_text(page, encoding="utf-8")
    net_log = tmp_path / "net.json"
    parts = check.read_dom(check.run_chromium(path, "--dump-dom", f"--log-net-log={net_log}"))
    assert [group for group, svgs in parts.plots if svgs == 1] == [
        "eval/rewards/accuracies",
        "train/loss",
        "train/rewards/margins",
    ]
    assert parts.tables == {"runs": 3} and parts.remote_refs == []
    assert check.page_requests(net_log) == []
    screenshot = tmp_path / "compare.png"
    check.run_chromium(path, f"--screenshot={screenshot}", "--window-size=1280,1600", "--hide-scrollbars")
    assert check.png_size(screenshot)[0] == 1280
