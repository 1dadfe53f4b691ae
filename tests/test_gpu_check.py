"""The GPU check's CPU rehearsal (`benchmarks/gpu_check.py --tiny`): every part's code path runs here, so a device
run is not spent on a typo; the CUDA-only parts are skipped by name."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load_module():
    if "gpu_check" not in sys.modules:  # registered first: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        sys.modules["gpu_check"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    return proc, out


def test_the_rehearsal_runs_every_part_and_exits_0(rehearsal):
    proc, out = rehearsal
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    gpu_check = load_module()
    assert list(report["parts"]) == list(gpu_check.PARTS)
    status = {name: gpu_check.status(result) for name, result in report["parts"].items()}
    liger = "pass" if importlib.util.find_spec("liger_kernel") else "FAIL"
    assert status == {
        "env": "pass",
        "fp32_cuda_vs_cpu": "rehearsed",
        "bf16_layouts": "pass",
        "speed": "pass",
        "liger": liger,
        "qlora": "rehearsed",
        "fsdp": "rehearsed",
        "zero2": "skipped",
        "zero3": "skipped",
    }
    assert "| speed | pass |" in (out / "gpu_check.md").read_text()


def test_the_rehearsal_skips_the_cuda_only_routes_by_name(rehearsal):
    report = json.loads((rehearsal[1] / "gpu_check.json").read_text())["parts"]
    assert "FlexAttention" in report["bf16_layouts"]["layouts"]["prefix-shared flex"]["skipped"]
    assert "FlexAttention" in report["speed"]["layouts"]["prefix-shared flex"]["skipped"]
    assert "4-bit needs CUDA" in report["qlora"]["skipped"] and report["qlora"]["quantized"] is False
    assert "accelerate launch --cpu" in report["fsdp"]["skipped"]
    assert "needs CUDA" in report["zero2"]["skipped"] and "needs CUDA" in report["zero3"]["skipped"]


def test_the_rehearsal_checks_what_it_reports(rehearsal):
    parts = json.loads((rehearsal[1] / "gpu_check.json").read_text())["parts"]
    layouts = parts["bf16_layouts"]["layouts"]
    assert {layouts[n]["took"] for n in ("padded", "packed", "prefix-shared sdpa")} == {
        "padded",
        "packed",
        "prefix_shared",
    }
    assert layouts["prefix-shared sdpa"]["loss_abs_diff"] < 1e-4  # fp32 on the CPU: the layouts agree closely
    assert parts["bf16_layouts"]["probe"]["sdpa, sliding window"]["took"] == "packed"
    speed = parts["speed"]
    assert speed["layouts"]["prefix-shared sdpa"]["model_tokens"] < speed["layouts"]["padded"]["model_tokens"]
    assert speed["reference_pass"]["pairs_per_s"] > 0
    losses = parts["qlora"]["losses"]
    assert len(losses) == 5 and losses[-1] < losses[0]
    fsdp = parts["fsdp"]
    assert len(fsdp["losses"]) == 3 and fsdp["update_rel_l2"] < 1e-6  # the same process setup: the same run
    assert fsdp["online_reference"]["reference"] == "initial_copy"


def test_a_failing_part_reports_its_error_and_an_isolated_part_runs_in_its_own_process(tmp_path, monkeypatch):
    gpu_check = load_module()
    settings = gpu_check.Settings(cuda=False, tiny=True, out=tmp_path, sizes=gpu_check.sizes(True))

    def broken(_settings):
        raise ValueError("a typo")

    monkeypatch.setattr(gpu_check, "part_env", broken)
    result = gpu_check.run_part("env", settings)
    assert result["ok"] is False and result["error"] == "ValueError: a typo" and "seconds" in result
    isolated = gpu_check.run_isolated("env", settings, timeout=120)  # a fresh process: the real part
    assert isolated["ok"] is True and isolated["device"] == "CPU"


def test_model_flops_count_the_work_of_each_layout():
    gpu_check = load_module()
    row = {"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8]}
    assert gpu_check.work([row], prefix_shared=True) == {
        "tokens": 4,
        "attended": 3 + 3 + 3,
        "completions": 2,
        "pair_tokens": 6,
    }
    assert gpu_check.work([row], prefix_shared=False) == {
        "tokens": 6,
        "attended": 6 + 6,
        "completions": 2,
        "pair_tokens": 6,
    }
