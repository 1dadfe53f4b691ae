"""Faults end in a sentence: settings no run can mean (infinite or NaN numbers) are refused where they are read,
naming the option."""

from __future__ import annotations

import math

import pytest

from pipeline import DPOConfig
from pipeline.config.params import check_params
from pipeline.core.errors import PipelineError


@pytest.mark.parametrize(
    "option, value",
    [
        ("beta", math.inf),
        ("beta", -math.inf),
        ("learning_rate", math.inf),
        ("label_smoothing", math.inf),
        ("adam_epsilon", math.nan),
        ("max_grad_norm", math.inf),
        ("loss_weights", [1.0, math.inf]),
    ],
)
def test_an_infinite_or_nan_option_is_refused_naming_it(option, value):
    with pytest.raises(PipelineError, match=rf"^{option} must be a finite number"):
        DPOConfig(output_dir="unused", **{option: value})


def test_an_infinite_params_value_is_refused_naming_its_key():
    with pytest.raises(PipelineError, match=r"params: train\.beta must be a finite number \(got inf\)"):
        check_params({"train": {"beta": math.inf}})


def test_training_whose_loss_turns_nan_stops_at_the_limit_and_saves_no_checkpoint_of_it(
    tmp_path, tiny_model, tiny_tokenizer
):
    import datasets
    import torch
    from transformers import TrainerCallback

    from conftest import random_pairs
    from pipeline import DPOTrainer

    class Poison(TrainerCallback):  # weights turn NaN before step 3's forward
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    tiny_model.get_input_embeddings().weight.fill_(math.nan)

    args = DPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        per_device_train_batch_size=2,
        max_steps=8,
        save_strategy="steps",
        save_steps=1,
        logging_steps=1,
        disable_tqdm=True,
        learning_rate=1e-4,
        max_nonfinite_steps=2,
        gradient_checkpointing=False,
    )
    trainer = DPOTrainer(
        model=tiny_model,
        args=args,
        train_dataset=datasets.Dataset.from_list(random_pairs(16)),
        processing_class=tiny_tokenizer,
        callbacks=[Poison()],
    )
    with pytest.raises(
        PipelineError,
        match=r"training stopped at step 4: the loss was nan, the 2\. step in a row .*"
        r"max_nonfinite_steps=2.*learning_rate or beta too large.*Nothing was published",
    ):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_max_nonfinite_steps_is_a_checked_option():
    assert DPOConfig(output_dir="unused").max_nonfinite_steps == 3
    with pytest.raises(PipelineError, match=r"max_nonfinite_steps must be >= 1 \(got 0\)"):
        DPOConfig(output_dir="unused", max_nonfinite_steps=0)


def test_the_log_history_file_is_valid_json_with_nonfinite_values_flagged():
    import json

    from pipeline.run.training import finite_entry

    entry = finite_entry({"loss": math.nan, "grad_norm": math.inf, "step": 3, "learning_rate": 1e-4})
    assert entry == {
        "loss": None,
        "grad_norm": None,
        "step": 3,
        "learning_rate": 1e-4,
        "nonfinite": ["grad_norm", "loss"],
    }
    json.loads(json.dumps(entry, allow_nan=False))
    assert finite_entry({"loss": 0.5}) == {"loss": 0.5}


def test_a_damaged_manifest_says_damaged_and_the_stage_to_re_run(tmp_path):
    from pipeline.store.artifacts import check_inputs

    artifact = tmp_path / "tokenized"
    artifact.mkdir()
    (artifact / "manifest.json").write_text('{"schema_version": 2, "stage": "toke')  # cut off mid-write
    with pytest.raises(
        PipelineError,
        match=r"manifest of this tokenized artifact is damaged: it cannot be read as "
        r"JSON .*`dvc repro tokenize`",
    ):
        check_inputs({"tokenized": artifact})
    (artifact / "manifest.json").write_text('{"schema_version": 2, "stage": "tokenize"}')
    with pytest.raises(PipelineError, match=r"damaged: its manifest lacks inputs, params, files"):
        check_inputs({"tokenized": artifact})
    (artifact / "manifest.json").write_text("[1, 2]")
    with pytest.raises(PipelineError, match=r"damaged: its manifest lacks every key"):
        check_inputs({"tokenized": artifact})


class _Hostile:
    """A pickle whose loading would run code: it would create the file named."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.target}",))


def _checkpoint(run_dir, step, fingerprint, optimizer):
    import json

    import torch

    from pipeline.run.resume import FINGERPRINT_NAME, TRAINER_STATE_NAME

    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / TRAINER_STATE_NAME).write_text(json.dumps({"global_step": step}))
    (folder / FINGERPRINT_NAME).write_text(
        json.dumps({"fingerprint": fingerprint.digest, "record": fingerprint.record})
    )
    torch.save(optimizer, folder / "optimizer.pt")
    return folder


def test_resume_skips_a_checkpoint_that_fails_to_load_and_never_runs_a_hostile_pickle(tmp_path):
    import pickle

    import torch

    from pipeline.run.resume import Fingerprint, plan_resume, run_checkpoints

    fingerprint = Fingerprint.of({"seed": 0})
    run_dir = run_checkpoints(tmp_path, fingerprint)
    good = _checkpoint(run_dir, 2, fingerprint, {"state": {0: torch.zeros(3)}})
    hostile = _checkpoint(run_dir, 4, fingerprint, {"state": {}})
    marker = tmp_path / "the-payload-ran"
    (hostile / "optimizer.pt").write_bytes(pickle.dumps(_Hostile(marker)))
    truncated = _checkpoint(run_dir, 6, fingerprint, {"state": {0: torch.ones(1000)}})
    (truncated / "optimizer.pt").write_bytes((truncated / "optimizer.pt").read_bytes()[:200])

    plan = plan_resume("auto", tmp_path, fingerprint)
    assert plan.checkpoint == good
    assert "skipping damaged checkpoint(s) (checkpoint-6: optimizer.pt cannot be loaded" in plan.note
    assert "checkpoint-4: optimizer.pt cannot be loaded (UnpicklingError" in plan.note
    assert set(plan.discard) == {hostile, truncated}
    assert not marker.exists()

    (good / "optimizer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(
        PipelineError,
        match=r"train\.resume=true but there is nothing to resume: every checkpoint .* "
        r"is damaged or incomplete \(checkpoint-6: .*checkpoint-2: optimizer\.pt",
    ):
        plan_resume(True, tmp_path, fingerprint)
    fresh = plan_resume("auto", tmp_path, fingerprint)
    assert fresh.checkpoint is None and "starting fresh" in fresh.note
    with pytest.raises(PipelineError, match=r"that checkpoint is damaged: optimizer\.pt cannot be loaded"):
        plan_resume(str(hostile), tmp_path, fingerprint)
    assert not marker.exists()
