"""`dpo sweep`: configurations trained side by side in chunks on one cached base/tokenize/ref-logps.

- exactness: a run trained through the sweep in 4 chunks, interleaved with 3 others, ends with the weights of the
  same configuration trained alone by the train stage (full fine-tuning, and LoRA with one shared base);
- early stopping: a learning rate 100x too high is stopped at the first rung, the sweep spends at most 60% of the
  steps of the 4 full runs, and its best run is the one the full runs rank first (by the judged win rate);
- a clone's first logged loss is its parent's boundary weights' loss on the next batch under the clone's settings;
  a warm start's is the parent's weights' loss on the first batch;
- killed and run again, every live run continues where it stopped and nothing finished or stopped is re-run;
- bad sweeps are refused before anything trains; hand requests reach a running sweep at its next boundary.
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import stages.sweep as sweep_stage
import stages.train as train_stage
from conftest import prepare_stages, tiny_params
from pipeline.config.params import check_params
from pipeline.config.train_params import check_train, dpo_config
from pipeline.core.errors import PipelineError
from pipeline.data.tables import load_pairs
from pipeline.model.loading import load_base_tokenizer, load_policy
from pipeline.publish.sweep_report import progress_text, render_sweep
from pipeline.run import sweep as sweep_module
from pipeline.run.resume import run_checkpoints
from pipeline.run.sweep import Sweep, SweepPaths
from pipeline.run.sweep_plan import configuration_params
from pipeline.run.sweep_state import holding_lock, load_state
from pipeline.run.trainer import DPOTrainer
from stages.cli import main

LEARNING_RATES = (3e-4, 1e-3, 3e-3, 1e-1)  # the last: 100x the good 1e-3, which the full runs rank first


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The built-in task with a base warm enough to write reviews the program judge scores (about 3 s)."""
    root = tmp_path_factory.mktemp("sweep")
    raw = copy.deepcopy(tiny_params(learning_rate=1e-3, num_train_epochs=1, logging_steps=1))
    raw["model"]["builtin"]["warmup_steps"] = 400
    raw["data"]["builtin"].update(num_pairs=160, num_eval_pairs=48)
    prepare_stages(check_params(raw), root, through="ref-logps")
    return root


def params_for(sweep: dict, peft: bool = False, **train) -> dict:
    raw = copy.deepcopy(tiny_params(learning_rate=1e-3, num_train_epochs=1, logging_steps=1, **train))
    raw["model"]["builtin"]["warmup_steps"] = 400
    raw["data"]["builtin"].update(num_pairs=160, num_eval_pairs=48)
    if peft:
        raw["model"]["peft"].update(enabled=True, r=4, lora_alpha=8)
    raw["sweep"].update(sweep)
    return check_train(check_params(raw))


def paths_of(root: Path, tmp: Path) -> SweepPaths:
    return SweepPaths(
        root / "tokenized", root / "ref_logps", root / "base", root / "normalized", tmp / "ck", tmp / "sw"
    )


def final_weights(sweep: Sweep, name: str, file: str = "model.safetensors") -> dict:
    run = sweep.state.runs[name]
    return load_file(run_checkpoints(sweep.paths.checkpoints, run.fingerprint) / f"checkpoint-{run.step}" / file)


def alone(root: Path, tmp: Path, params: dict, file: str) -> dict:
    out = tmp / "alone"
    train_stage.run(params, root / "tokenized", root / "ref_logps", root / "base", out, tmp / "ck-alone", tmp / "lv")
    return load_file(out / "model" / file)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def chunk_lines(messages: list[str]) -> list[str]:
    return [m for m in messages if ": chunk " in m]


def test_a_run_through_the_sweep_ends_with_the_weights_of_an_uninterrupted_run(root, tmp_path):
    grid = {"train.learning_rate": [1e-3, 3e-3], "train.beta": [0.1, 0.5]}
    params = params_for({"grid": grid, "chunks": 4, "eta": 1, "metric": "loss"})
    messages = []
    sweep = Sweep(params, paths_of(root, tmp_path), say=messages.append)
    sweep.run()
    assert len(chunk_lines(messages)) == 16
    # interleaved: every run's chunk 1 before any run's chunk 2
    assert [m.split(":")[1].strip() for m in chunk_lines(messages)[:4]] == ["c1", "c2", "c3", "c4"]
    run = sweep.state.runs["c3"]
    assert run.overrides == {"train.learning_rate": 3e-3, "train.beta": 0.1} and run.chunks_done == 4
    expected = alone(root, tmp_path, configuration_params(params, run.overrides, "c3"), "model.safetensors")
    assert max_difference(final_weights(sweep, "c3"), expected) <= 1e-6


def test_lora_runs_share_one_base_and_end_as_if_trained_alone(root, tmp_path, monkeypatch):
    loads = []
    real = sweep_module.load_policy
    monkeypatch.setattr(sweep_module, "load_policy", lambda *a, **k: loads.append(1) or real(*a, **k))
    params = params_for({"grid": {"train.learning_rate": [1e-3, 3e-3], "model.peft.r": [4, 8]}, "eta": 1}, peft=True)
    sweep = Sweep(params, paths_of(root, tmp_path), say=lambda m: None)
    sweep.run()
    assert len(loads) == 1  # 4 configurations x 4 chunks, one base model loaded
    run = sweep.state.runs["c4"]
    expected = alone(root, tmp_path, configuration_params(params, run.overrides, "c4"), "adapter_model.safetensors")
    assert max_difference(final_weights(sweep, "c4", "adapter_model.safetensors"), expected) <= 1e-6


def test_a_bad_learning_rate_is_stopped_at_the_first_rung_and_the_best_run_is_the_full_runs_first(root, tmp_path):
    configurations = [{"train.learning_rate": lr} for lr in LEARNING_RATES]
    common = {"configurations": configurations, "chunks": 4, "metric": "win_rate", "judge_prompts": 48}
    full = Sweep(params_for({**common, "eta": 1, "name": "full"}), paths_of(root, tmp_path), say=lambda m: None)
    full_state = full.run()
    halving = Sweep(params_for({**common, "eta": 2, "name": "halving"}), paths_of(root, tmp_path), say=lambda m: None)
    state = halving.run()
    bad = state.runs["c4"]
    assert bad.state == "stopped" and bad.stopped["chunk"] == 1 and bad.stopped["by"] == "rule"
    assert "win_rate" in bad.stopped["why"]
    spent = sum(r.step for r in state.runs.values())
    everything = sum(r.total_steps for r in full_state.runs.values())
    assert spent <= 0.6 * everything, (spent, everything)
    from pipeline.run.sweep_plan import ranked

    full_best = ranked({n: r.metrics for n, r in full_state.runs.items()}, "win_rate")[0]
    finished = [r.name for r in state.runs.values() if r.state == "finished"]
    assert finished == [full_best] == ["c2"]
    # the report: every run, why each stopped one stopped, its curves; the table in the terminal
    page = render_sweep(state, {n: {"eval/win_rate": [(5, 0.5)]} for n in state.runs}, "win_rate")
    assert all(f"<td>{n}</td>" in page for n in state.runs) and "stopped at chunk 1 (rule)" in page
    assert "<svg" in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    table = progress_text(state, "win_rate").splitlines()
    assert len(table) == 5 and table[0].split()[:5] == ["run", "state", "chunks", "step", "win_rate"]


def loss_at(root: Path, tmp: Path, params: dict, weights: Path, step: int) -> float:
    """The training loss of `params` on the batch an uninterrupted run takes at `step` (0-based, first epoch), with
    the weights of the checkpoint `weights`."""
    model = load_policy(root / "base", params)
    model.load_state_dict(load_file(weights / "model.safetensors"), strict=False)
    args = dpo_config(params, tmp / "probe", save_strategy="no")
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=load_pairs(root / "tokenized", "train", root / "ref_logps"),
        processing_class=load_base_tokenizer(root / "base", params),
    )
    batch = next(itertools.islice(iter(trainer.get_train_dataloader()), step, None))
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch)))


def logged_losses(sweep: Sweep, name: str) -> dict[int, float]:
    run = sweep.state.runs[name]
    checkpoint = run_checkpoints(sweep.paths.checkpoints, run.fingerprint) / f"checkpoint-{run.step}"
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def test_a_clone_starts_from_its_parents_boundary_and_a_warm_start_from_its_weights(root, tmp_path):
    params = params_for({"grid": {"train.learning_rate": [1e-3, 3e-3]}, "chunks": 4, "eta": 1, "metric": "loss"})
    sweep = Sweep(params, paths_of(root, tmp_path), say=lambda m: None)
    sweep.train_chunk(sweep.state.runs["c1"])
    parent = sweep.state.runs["c1"]
    boundary = run_checkpoints(sweep.paths.checkpoints, parent.fingerprint) / f"checkpoint-{parent.step}"
    saved_boundary = tmp_path / "boundary"
    shutil.copytree(boundary, saved_boundary)
    clone = sweep.clone("c1", {"train.beta": 0.5}, "clone")
    warm = sweep.clone("c1", {"train.beta": 0.5}, "warm-start")
    with pytest.raises(PipelineError, match="num_train_epochs cannot change in a clone.*--warm-start"):
        sweep.clone("c1", {"train.num_train_epochs": 2}, "clone")
    assert (clone.chunks_done, clone.step, warm.chunks_done, warm.step) == (1, parent.step, 0, 0)
    for run in (clone, warm):
        sweep.train_chunk(run)
    new = configuration_params(params, clone.overrides, "clone")
    expected_clone = loss_at(root, tmp_path, new, saved_boundary, parent.step)
    expected_warm = loss_at(root, tmp_path, new, saved_boundary, 0)
    assert logged_losses(sweep, clone.name)[parent.step + 1] == pytest.approx(expected_clone, abs=1e-6)
    assert logged_losses(sweep, warm.name)[1] == pytest.approx(expected_warm, abs=1e-6)
    assert expected_clone != pytest.approx(logged_losses(sweep, clone.name)[1], abs=1e-3)  # not the base's
    assert sweep.state.runs[warm.name].start == {
        "parent": "c1",
        "fingerprint": parent.fingerprint,
        "chunk": 0,
        "step": parent.step,
        "mode": "warm-start",
    }


class Killed(Exception):
    pass


def test_a_killed_sweep_run_again_resumes_every_live_run_and_reruns_nothing_done(root, tmp_path):
    grid = {"train.learning_rate": [3e-4, 1e-3, 3e-3, 1e-1]}
    params = params_for({"grid": grid, "chunks": 4, "metric": "loss"})
    whole = Sweep(params, paths_of(root, tmp_path / "whole"), say=lambda m: None)
    whole.run()
    done = []

    def kill_after_five(state):
        done.append(1)
        if len(done) == 6:  # 4 chunk-1 boundaries, the rung, the first chunk-2 boundary: killed there
            raise Killed

    first = Sweep(params, paths_of(root, tmp_path), say=lambda m: None, on_boundary=kill_after_five)
    with pytest.raises(Killed):
        first.run()
    messages = []
    again = Sweep(params, paths_of(root, tmp_path), say=messages.append)
    again.run()
    trained = [m.split(":")[1].strip() + m.split("chunk")[1].split("(")[0].strip() for m in chunk_lines(messages)]
    remaining = sum(r.chunks_done for r in whole.state.runs.values()) - 4 - 1
    assert len(trained) == remaining and not any(t.endswith("1/4") for t in trained)
    for name, run in whole.state.runs.items():
        assert (again.state.runs[name].state, again.state.runs[name].chunks_done) == (run.state, run.chunks_done)
    survivor = next(n for n, r in whole.state.runs.items() if r.state == "finished")
    assert max_difference(final_weights(again, survivor), final_weights(whole, survivor)) <= 1e-6
    third = []
    Sweep(params, paths_of(root, tmp_path), say=third.append).run()
    assert chunk_lines(third) == []  # finished and stopped runs are never trained again


@pytest.mark.parametrize(
    "sweep, train, expected",
    [
        ({"grid": {"train.betta": [0.1, 0.2]}}, {}, r"sweep.grid: unknown key train.betta \(did you mean `train.beta`"),
        ({"grid": {"model.name_or_path": ["a", "b"]}}, {}, "unknown key model.name_or_path.*train.<option>"),
        ({"grid": {"train.beta": [0.1]}}, {}, r"sweep.grid.train.beta has 1 value; .*two or more"),
        ({"grid": {"train.beta": [0.1, 0.2]}, "chunks": 40}, {}, r"sweep.chunks is 40, .*only 20 optimizer steps"),
        (
            {"grid": {"train.beta": [0.1, 0.2]}, "metric": "win_rate"},
            {"judge": "none"},
            "win_rate, but there is no judge",
        ),
        ({"grid": {"train.beta": [0.1, -1.0]}}, {}, r"sweep configuration 2 .*beta"),
    ],
)
def test_a_bad_sweep_is_refused_before_anything_trains(root, tmp_path, sweep, train, expected):
    params = params_for(sweep)
    params["evaluate"].update(train)
    with pytest.raises(PipelineError, match=expected):
        Sweep(params, paths_of(root, tmp_path), say=lambda m: None)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "sw").exists()


def test_hand_requests_reach_a_running_sweep_at_its_next_boundary(root, tmp_path):
    params = params_for({"grid": {"train.learning_rate": [1e-3, 3e-3]}, "chunks": 2, "eta": 1, "metric": "loss"})
    paths = paths_of(root, tmp_path)
    with pytest.raises(PipelineError, match="nothing to act on yet"):
        sweep_stage.request(params, paths, {"action": "stop", "run": "c1"}, say=lambda m: None)
    sweep = Sweep(params, paths, say=lambda m: None)
    sweep.train_chunk(sweep.state.runs["c1"])
    said = []
    with holding_lock(sweep.dir):  # as a running sweep holds it
        sweep_stage.request(params, paths, {"action": "stop", "run": "c2"}, say=said.append)
    assert "at its next chunk boundary" in said[0] and load_state(sweep.dir).runs["c2"].state == "live"
    sweep.run()  # picks the request up
    assert sweep.state.runs["c2"].state == "stopped" and sweep.state.runs["c2"].stopped["by"] == "hand"
    assert sweep.state.runs["c2"].chunks_done == 0 and sweep.state.runs["c1"].state == "finished"
    # no sweep running: the CLI acts at once
    args = ["sweep", "--params", str(write_params(tmp_path, params)), *path_args(paths)]
    result = CliRunner().invoke(main, [*args, "resume", "c1"])
    assert result.exit_code == 1 and "has trained all 2 chunks; clone it" in result.output
    result = CliRunner().invoke(main, [*args, "resume", "c2"])
    assert result.exit_code == 0 and "c2 resumes after chunk 0" in result.output, result.output
    result = CliRunner().invoke(main, [*args, "clone", "c1", "-S", "train.beta=0.3", "--warm-start"])
    assert result.exit_code == 0 and "c3: a warm-start of c1" in result.output, result.output
    result = CliRunner().invoke(main, [*args])
    assert result.exit_code == 0, result.output
    shown = CliRunner().invoke(main, [*args, "show"]).output
    assert [line.split()[:2] for line in shown.splitlines()[1:]] == [["c1", "finished"]] * 1 + [
        ["c2", "finished"],
        ["c3", "finished"],
    ]
    assert (sweep.dir / "report.html").is_file()


def write_params(tmp: Path, params: dict) -> Path:
    import yaml

    raw = copy.deepcopy(params)
    raw["sweep"]["experiments"] = False
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def path_args(paths: SweepPaths) -> list[str]:
    return [
        *("--tokenized", str(paths.tokenized), "--ref-logps", str(paths.ref_logps), "--base", str(paths.base)),
        *("--normalized", str(paths.normalized), "--checkpoints", str(paths.checkpoints)),
        *("--sweeps", str(paths.sweeps)),
    ]
