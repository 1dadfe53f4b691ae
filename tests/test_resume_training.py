"""Resuming from a Trainer checkpoint gives the run that was never interrupted: model or adapter,
optimizer, scheduler, RNG (dropout stays on here, so the RNG matters) and a TR-DPO reference."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from pipeline import DPOConfig, DPOTrainer
from pipeline.core.errors import PipelineError
from pipeline.run.resume import last_run
from test_peft_trainer import dataset, lora, make_rows

ROWS = make_rows(24, seed=3)


def config(output_dir, **kwargs) -> DPOConfig:
    settings = dict(
        output_dir=str(output_dir),
        report_to="none",
        gradient_checkpointing=False,
        disable_tqdm=True,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="steps",
        save_steps=3,
        max_steps=6,
        learning_rate=5e-3,
        warmup_steps=2,
        lr_scheduler_type="linear",
        beta=0.5,
        seed=7,
        disable_dropout=False,
    )
    settings.update(kwargs)
    return DPOConfig(**settings)


def dropout_model(tiny_tokenizer):
    from pipeline.builtin.model import build_model

    model = build_model(tiny_tokenizer, seed=0, hidden_size=32, num_layers=1, num_heads=2)
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.1
    return model


def trainable_state(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["lora", "full_tr_dpo"])
def test_resumed_run_equals_the_uninterrupted_one(tmp_path, tiny_tokenizer, kind):
    extra = (
        {"sync_ref_model": True, "ref_model_sync_steps": 2, "ref_model_mixup_alpha": 0.5}
        if kind == "full_tr_dpo"
        else {}
    )
    peft = {"peft_config": lora(lora_dropout=0.2)} if kind == "lora" else {}

    def trainer_for(output_dir):
        return DPOTrainer(
            dropout_model(tiny_tokenizer),
            args=config(output_dir, **extra),
            train_dataset=dataset(ROWS),
            processing_class=tiny_tokenizer,
            **copy.deepcopy(peft),
        )

    whole = trainer_for(tmp_path / "whole")
    whole.train()
    expected = trainable_state(whole)
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    assert (checkpoint / ("adapter_model.safetensors" if kind == "lora" else "model.safetensors")).exists()
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "scheduler.pt").exists()
    assert list(checkpoint.glob("rng_state*.pth"))

    resumed = trainer_for(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    got = trainable_state(resumed)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.allclose(got[name], value, atol=1e-6, rtol=0), name
    losses = lambda t: [e["loss"] for e in t.state.log_history if "loss" in e and e["step"] > 3]  # noqa: E731
    assert losses(resumed) == pytest.approx(losses(whole), abs=1e-6)
    assert resumed.state.log_history[-1]["num_tokens"] == whole.state.log_history[-1]["num_tokens"] > 0  # continued
    if kind == "full_tr_dpo":  # the moving reference was saved with the checkpoint and restored
        assert (checkpoint / "ref_model.safetensors").exists()
        for a, b in zip(resumed.ref_model.parameters(), whole.ref_model.parameters()):
            assert torch.allclose(a, b, atol=1e-6, rtol=0)

    # control: the same weights without the optimizer, scheduler and RNG state end elsewhere
    restarted = trainer_for(tmp_path / "restarted")
    restarted._load_from_checkpoint(str(checkpoint))
    restarted.args.max_steps = 3
    restarted.train()
    assert any(not torch.allclose(trainable_state(restarted)[n], v, atol=1e-6) for n, v in expected.items())


# ---- through the train stage: train.resume -----------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from conftest import prepare_stages, tiny_params

    root = tmp_path_factory.mktemp("resume")
    prepare_stages(tiny_params(), root, through="ref-logps")
    return root


def train_stage_run(root, out, resume=None, **train):
    import stages.train as train_stage
    from conftest import tiny_params

    params = tiny_params(save_strategy="steps", save_steps=2, max_steps=4, learning_rate=3e-3, **train)
    if resume is not None:
        params["train"]["resume"] = resume
    return train_stage.run(
        params, root / "tokenized", root / "ref_logps", root / "base", out / "train", out / "ck", out / "live"
    )


class Interrupted(Exception):
    pass


def interrupted_run(monkeypatch, root, out, at_step: int) -> Path:
    """A train stage run stopped (by an exception) at the end of step `at_step`; returns its checkpoints' dir."""
    from transformers import TrainerCallback

    import pipeline.run.training as training

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == at_step:
                raise Interrupted

    class StoppingTrainer(training.DPOTrainer):
        def __init__(self, *args, callbacks=None, **kwargs):
            super().__init__(*args, callbacks=[*(callbacks or []), StopAt()], **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(training, "DPOTrainer", StoppingTrainer)
        with pytest.raises(Interrupted):
            train_stage_run(root, out)
    (run_dir,) = (out / "ck").iterdir()
    return run_dir


def final_weights(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "train" / "model" / "model.safetensors"))


def test_train_stage_resume_true_and_a_checkpoint_path(prepared, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    train_stage_run(prepared, whole)
    expected = final_weights(whole)
    assert last_run(whole / "ck")["resumed_from"] is None
    assert [p.name for p in (whole / "ck").iterdir()] == ["runs.jsonl"]  # a finished run's checkpoints are removed

    interrupted = tmp_path / "interrupted"  # stopped at step 3: checkpoint-2 is the last complete one
    run_dir = interrupted_run(monkeypatch, prepared, interrupted, at_step=3)
    checkpoint = run_dir / "checkpoint-2"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["log_history"][-1]["marker"] = "from the checkpoint"  # to see that steps 1-2 are not trained again
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    train_stage_run(prepared, interrupted, resume=True)
    assert last_run(interrupted / "ck")["resumed_from"] == f"{run_dir.name}/checkpoint-2"
    history = json.loads((interrupted / "train" / "log_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == [2, 4] and history[0]["marker"] == "from the checkpoint"
    for name, value in final_weights(interrupted).items():
        assert torch.equal(value, expected[name]), name
    assert not run_dir.exists()

    by_path = tmp_path / "by_path"
    run_dir = interrupted_run(monkeypatch, prepared, by_path, at_step=3)
    train_stage_run(prepared, by_path, resume=str(run_dir / "checkpoint-2"))
    assert last_run(by_path / "ck")["resumed_from"] == f"{run_dir.name}/checkpoint-2"
    for name, value in final_weights(by_path).items():
        assert torch.equal(value, expected[name]), name

    with pytest.raises(PipelineError, match="nothing to resume: no checkpoints at all"):  # true refuses a fresh start
        train_stage_run(prepared, tmp_path / "fresh", resume=True)
    with pytest.raises(PipelineError, match="not a Trainer checkpoint"):
        train_stage_run(prepared, tmp_path / "bad", resume=str(tmp_path / "nowhere"))
    unmarked = tmp_path / "unmarked"  # a checkpoint without fingerprint.json cannot be checked: refused
    run_dir = interrupted_run(monkeypatch, prepared, unmarked, at_step=3)
    (run_dir / "checkpoint-2" / "fingerprint.json").unlink()
    with pytest.raises(PipelineError, match="no readable fingerprint.json"):
        train_stage_run(prepared, unmarked, resume=str(run_dir / "checkpoint-2"))
