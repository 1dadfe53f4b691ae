"""The train stage's resume, end to end: a run killed (SIGKILL) and resumed gives the uninterrupted run's bytes
(weights, log history, DVCLive curves, token count); a checkpoint of other params is never reused; an incomplete
checkpoint is skipped by name; and two fresh runs give byte-identical outputs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import prepare_stages, tiny_params
from pipeline.core.errors import PipelineError
from pipeline.run.resume import last_run

TESTS = Path(__file__).resolve().parent
TRAIN = {"save_strategy": "steps", "save_steps": 3, "max_steps": 8, "logging_steps": 1, "learning_rate": 3e-3}
KILL_STEP = 7  # checkpoints 3 and 6 are complete, and step 7 was logged after the last one

# the train stage in a child process that SIGKILLs itself once step KILL_STEP is logged (a test-only trainer)
KILLED_RUN = """
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from transformers import TrainerCallback
import pipeline.run.training as training
import stages.train as train_stage
from conftest import tiny_params

class KillAt(TrainerCallback):
    def on_log(self, args, state, control, **kwargs):
        if state.global_step == int(sys.argv[4]):
            os.kill(os.getpid(), signal.SIGKILL)

class KilledTrainer(training.DPOTrainer):
    def __init__(self, *args, callbacks=None, **kwargs):
        super().__init__(*args, callbacks=[*(callbacks or []), KillAt()], **kwargs)

training.DPOTrainer = KilledTrainer
root, out = Path(sys.argv[2]), Path(sys.argv[3])
params = tiny_params(**json.loads(sys.argv[5]))
train_stage.run(params, root / "tokenized", root / "ref_logps", root / "base", out / "train", out / "ck", out / "live")
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    prepare_stages(tiny_params(), root, through="ref-logps")
    return root


def params_for(resume=None, **train):
    params = tiny_params(**{**TRAIN, **train})
    if resume is not None:
        params["train"]["resume"] = resume
    return params


def train(root: Path, out: Path, resume=None, **overrides) -> dict:
    import stages.train as train_stage

    return train_stage.run(
        params_for(resume, **overrides),
        root / "tokenized",
        root / "ref_logps",
        root / "base",
        out / "train",
        out / "ck",
        out / "live",
        say=print,
    )


def files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "train" / "model" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb)
    assert all(torch.equal(wa[name], wb[name]) for name in wa)


@pytest.fixture(scope="module")
def whole(root, tmp_path_factory):
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("whole")
    manifest = train(root, out)
    return out, manifest


@pytest.fixture(scope="module")
def killed(root, tmp_path_factory):
    """A run killed by SIGKILL at step KILL_STEP: its checkpoints and its (partial) DVCLive directory."""
    out = tmp_path_factory.mktemp("killed")
    child = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(TESTS), str(root), str(out), str(KILL_STEP), json.dumps(TRAIN)],
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert not (out / "train").exists()  # a killed stage leaves no artifact
    (run_dir,) = (out / "ck").iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert "7\t" in (out / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text()  # logged past checkpoint 6
    return out


def resume_copy(killed: Path, dest: Path) -> Path:
    shutil.copytree(killed / "ck", dest / "ck")
    shutil.copytree(killed / "live", dest / "live")
    return next((dest / "ck").iterdir())


def test_two_fresh_runs_give_the_same_bytes(root, whole, tmp_path):
    out, manifest = whole
    again = train(root, tmp_path)
    assert last_run(tmp_path / "ck")["resumed_from"] is None and again == manifest
    assert files(tmp_path / "train") == files(out / "train")
    assert files(tmp_path / "live") == files(out / "live")
    assert "training_args.bin" not in files(out / "train")["manifest.json"].decode()
    history = json.loads((out / "train" / "log_history.json").read_text())
    assert not [k for entry in history for k in entry if k.endswith(("_runtime", "_per_second"))]
    assert not [k for k in manifest["train_metrics"] if k.endswith(("_runtime", "_per_second"))]
    live = out / "live" / "plots" / "metrics"
    assert (live / "train" / "rewards" / "accuracies.tsv").exists()
    assert [line.split("\t")[0] for line in (live / "train" / "loss.tsv").read_text().splitlines()] == [
        "step",
        *map(str, range(1, 9)),
    ]
    metrics = json.loads((out / "live" / "metrics.json").read_text())
    assert metrics["step"] == 8 and "train_runtime" not in json.dumps(metrics)
    assert not (out / "ck" / manifest["fingerprint"][:16]).exists()  # a finished run's checkpoints are removed


def test_a_killed_run_resumes_to_the_uninterrupted_bytes(root, whole, killed, tmp_path, capsys):
    run_dir = resume_copy(killed, tmp_path)
    manifest = train(root, tmp_path)  # resume: auto, the default
    assert last_run(tmp_path / "ck")["resumed_from"] == f"{run_dir.name}/checkpoint-6"  # recorded outside the artifact
    assert "resuming from" in capsys.readouterr().out
    out, expected = whole
    assert files(tmp_path / "train") == files(out / "train")  # the artifact, manifest included: DVC sees no change
    assert_same_weights(tmp_path, out)
    assert (tmp_path / "train" / "log_history.json").read_bytes() == (out / "train" / "log_history.json").read_bytes()
    assert files(tmp_path / "live") == files(out / "live")  # continuous curves: step 7 not kept twice
    assert manifest["train_metrics"]["num_tokens"] == expected["train_metrics"]["num_tokens"] > 0
    assert manifest["train_metrics"] == expected["train_metrics"]
    assert not run_dir.exists()


def test_an_incomplete_checkpoint_is_skipped_by_name(root, whole, killed, tmp_path, capsys):
    run_dir = resume_copy(killed, tmp_path)
    (run_dir / "checkpoint-6" / "fingerprint.json").unlink()  # as if killed while saving it
    train(root, tmp_path)
    assert last_run(tmp_path / "ck")["resumed_from"] == f"{run_dir.name}/checkpoint-3"
    assert "skipping incomplete checkpoint(s) checkpoint-6" in capsys.readouterr().out
    assert_same_weights(tmp_path, whole[0])
    assert files(tmp_path / "live") == files(whole[0] / "live")


def test_a_changed_beta_does_not_reuse_the_checkpoint(root, killed, tmp_path, capsys):
    run_dir = resume_copy(killed, tmp_path)
    with pytest.raises(
        PipelineError,
        match=r"nothing to resume: no checkpoint of this run's fingerprint .*"
        r"checkpoints exist for other configs: .*train\.beta: 0\.1 → 0\.2",
    ):
        train(root, tmp_path, resume=True, beta=0.2)
    with pytest.raises(PipelineError, match=r"made for other params or inputs \(train\.beta: 0\.1 → 0\.2\)"):
        train(root, tmp_path, resume=str(run_dir / "checkpoint-6"), beta=0.2)

    train(root, tmp_path, beta=0.2)  # auto: starts fresh, and says why
    assert last_run(tmp_path / "ck")["resumed_from"] is None
    assert "starting fresh" in capsys.readouterr().out
    assert run_dir.exists()  # another fingerprint's checkpoints are left alone
    fresh = tmp_path / "fresh"
    train(root, fresh, beta=0.2)
    assert_same_weights(tmp_path, fresh)
