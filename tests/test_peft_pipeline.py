"""Adapters and references through the stages: ref-logps computes the reference online training uses,
an adapter run evaluates and exports (merged, same log-probs), and the push goes through the stage."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import pipeline.objective.reference as reference_module
import stages.base as base_stage
import stages.evaluate as evaluate_stage
import stages.export as export_stage
import stages.ref_logps as ref_stage
import stages.tokenize as tokenize_stage
import stages.train as train_stage
from pipeline.config.params import check_params
from pipeline.core.errors import PipelineError
from pipeline.store.artifacts import read_manifest

LORA = {"enabled": True, "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}


def with_changes(
    params: dict, model: dict | None = None, train: dict | None = None, export: dict | None = None
) -> dict:
    params = copy.deepcopy(params)
    params["model"].update(model or {})
    params["train"].update(train or {})
    params["export"].update(export or {})
    return check_params(params)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """base (built-in, warm-started), normalized and tokenized artifacts at test size, shared by the tests here."""
    from conftest import prepare_stages, tiny_params

    root = tmp_path_factory.mktemp("peft")
    params = tiny_params()
    prepare_stages(params, root)
    return params, root


def reseal(directory):
    """Re-digest an artifact a test changed on purpose (the stages refuse files that differ from their manifest)."""
    from pipeline.store.artifacts import MANIFEST
    from pipeline.store.digests import file_digest

    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["files"] = {
        str(p.relative_to(directory)): file_digest(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (directory / MANIFEST).write_text(json.dumps(manifest))


def tokenized_for(params, root, base, out):
    """The tokenized artifact of `base`: the shared one, or (another base artifact) its own, as `dvc repro` would."""
    if base == root / "base":
        return root / "tokenized"
    tokenize_stage.run(params, root / "normalized", base, out / "tokenized")
    return out / "tokenized"


def first_logged_step(params, root, base, out) -> dict:
    """Train one step with precomputed reference log-probs (from the ref-logps stage) and one with the online
    reference; return both first log entries."""
    tokenized = tokenized_for(params, root, base, out)
    ref_stage.run(params, tokenized, base, out / "ref_logps")
    first = {}
    for precompute in (True, False):
        run_params = with_changes(
            params,
            train={"precompute_ref_log_probs": precompute, "max_steps": 1, "logging_steps": 1, "learning_rate": 1e-3},
        )
        train_dir = out / f"train-{precompute}"
        train_stage.run(
            run_params,
            tokenized,
            out / "ref_logps",
            base,
            train_dir,
            out / f"ck-{precompute}",
            out / f"live-{precompute}",
        )
        first[precompute] = json.loads((train_dir / "log_history.json").read_text())[0]
    return first


def ref_logps_table(path) -> torch.Tensor:
    import pyarrow.parquet as pq

    table = pq.read_table(path / "train.parquet").to_pydict()
    return torch.tensor([table["ref_chosen_logps"], table["ref_rejected_logps"]])


def saved_adapter(base_dir, out, seed=1):
    """An adapter with non-zero weights on the base model, saved as an earlier run would have."""
    from peft import LoraConfig, get_peft_model

    from pipeline.model.loading import load_causal_lm

    model = get_peft_model(
        load_causal_lm(str(base_dir / "model")),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("case", ["new_adapter", "continued_adapter", "explicit_reference"])
def test_ref_logps_stage_computes_the_reference_of_the_online_path(prepared, tmp_path, case, monkeypatch):
    params, root = prepared
    base = root / "base"
    if case == "new_adapter":
        params = with_changes(params, model={"peft": LORA})
    elif case == "continued_adapter":
        params = with_changes(params, model={"adapter": str(saved_adapter(base, tmp_path / "adapter"))})
    else:
        from pipeline.model.loading import load_causal_lm

        other = load_causal_lm(str(base / "model"))
        with torch.no_grad():
            for p in other.parameters():
                p.mul_(1.05)
        other.save_pretrained(tmp_path / "ref_model")
        params = with_changes(params, model={"ref_name_or_path": str(tmp_path / "ref_model")})
    if case != "new_adapter":  # the base stage records the adapter / reference model
        base = tmp_path / "base"
        base_stage.run(params, base)
        assert ("adapter" in read_manifest(base, "base")) == (case == "continued_adapter")
    first = first_logged_step(params, root, base, tmp_path)
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
        assert first[True][name] == pytest.approx(first[False][name], abs=1e-4), name
    base_ref = root / "base_ref_logps"
    if not base_ref.exists():
        ref_stage.run(prepared[0], root / "tokenized", root / "base", base_ref)
    differs = (ref_logps_table(tmp_path / "ref_logps") - ref_logps_table(base_ref)).abs().max().item()
    if case == "explicit_reference":
        assert abs(first[True]["rewards/margins"]) > 1e-4 and differs > 1e-3
        assert read_manifest(tmp_path / "ref_logps", "ref_logps")["reference"] == "explicit"
    elif case == "continued_adapter":  # the starting adapter is the reference: no reward before the first update
        assert first[True]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6) and differs > 1e-3
        assert read_manifest(tmp_path / "ref_logps", "ref_logps")["reference"] == "starting adapter"
        assert json.loads((tmp_path / "train-True" / "model" / "adapter_config.json").read_text())["r"] == 4
    else:  # a new adapter's reference is the base model
        assert differs == 0.0 and first[True]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    # evaluate's online reference is the ref-logps stage's too; a new adapter's is the policy with the
    # adapter off, so evaluate loads the base model once (a second load would fail here)
    if case == "new_adapter":
        monkeypatch.setattr(
            reference_module, "load_policy", lambda *a, **k: pytest.fail("evaluate loaded the base twice")
        )
    evaluated = {}
    for precompute in (True, False):
        eval_params = with_changes(params, train={"precompute_ref_log_probs": precompute})
        evaluated[precompute] = evaluate_stage.run(
            eval_params,
            tmp_path / "train-True",
            tokenized_for(params, root, base, tmp_path),
            tmp_path / "ref_logps",
            root / "normalized",
            base,
            tmp_path / f"eval-{precompute}",
            tmp_path / f"metrics-{precompute}.json",
        )
    for name in ("loss", "rewards/chosen", "rewards/margins"):
        assert evaluated[True][name] == pytest.approx(evaluated[False][name], abs=1e-4), name


def test_evaluating_a_new_adapter_generates_the_reference_with_the_adapter_off(prepared, tmp_path, monkeypatch):
    """A new adapter's reference is the base: evaluate gets it by switching the adapter off, without loading
    the base a second time, and the reference's generations are the base model's (the policy's differ)."""
    import shutil

    from pipeline.judge.sampling import Sampling, generate_answers, held_out_prompts
    from pipeline.model.loading import load_base_tokenizer, load_causal_lm

    params, root = prepared
    params = with_changes(params, model={"peft": LORA})
    base = root / "base"
    ref_stage.run(params, root / "tokenized", base, tmp_path / "ref_logps")
    train_stage.run(
        params, root / "tokenized", tmp_path / "ref_logps", base, tmp_path / "train", tmp_path / "ck", tmp_path / "live"
    )
    shutil.rmtree(tmp_path / "train" / "model")  # a far-trained adapter in its place, so the two sides differ
    saved_adapter(base, tmp_path / "train" / "model", seed=3)
    reseal(tmp_path / "train")
    monkeypatch.setattr(reference_module, "load_policy", lambda *a, **k: pytest.fail("evaluate loaded the base twice"))
    evaluate_stage.run(
        params,
        tmp_path / "train",
        root / "tokenized",
        tmp_path / "ref_logps",
        root / "normalized",
        base,
        tmp_path / "eval",
        tmp_path / "metrics.json",
    )
    examples = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    cfg = params["evaluate"]
    answers = generate_answers(
        load_causal_lm(str(base / "model")),
        load_base_tokenizer(base, params),
        held_out_prompts(root / "normalized", cfg["num_generations"]),
        Sampling(cfg["max_new_tokens"], cfg["batch_size"]),
    )
    answers = [samples[0] for samples in answers]
    assert answers == [e["reference"] for e in examples]
    assert answers != [e["policy"] for e in examples]


def test_qlora_params_are_refused_clearly_without_cuda(prepared, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without CUDA")
    params, root = prepared
    params = with_changes(
        params,
        model={"peft": LORA, "quantization": {**params["model"]["quantization"], "load_in_4bit": True}},
        train={"precompute_ref_log_probs": False},
    )
    message = "needs a CUDA GPU and bitsandbytes; this machine has no CUDA device"
    with pytest.raises(PipelineError, match=message):
        ref_stage.run(params, root / "tokenized", root / "base", tmp_path / "ref")
    with pytest.raises(PipelineError, match=message):
        train_stage.run(
            params,
            root / "tokenized",
            tmp_path / "ref",
            root / "base",
            tmp_path / "train",
            tmp_path / "ck",
            tmp_path / "live",
        )
    assert not (tmp_path / "train").exists() and not (tmp_path / "ref").exists()


def test_adapter_run_evaluates_exports_merged_and_pushes(prepared, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.model.loading import load_causal_lm
    from test_export_push import SECRET, LocalHub, logps

    params, root = prepared
    params = with_changes(
        params,
        model={"peft": LORA},
        train={"learning_rate": 5e-3},
        export={"push": {"enabled": True, "repo_id": "user/dpo-lora", "private": True}},
    )
    ref_stage.run(params, root / "tokenized", root / "base", tmp_path / "ref_logps")
    train_stage.run(
        params,
        root / "tokenized",
        tmp_path / "ref_logps",
        root / "base",
        tmp_path / "train",
        tmp_path / "ck",
        tmp_path / "live",
    )
    assert (tmp_path / "train" / "model" / "adapter_config.json").exists()
    assert not list((tmp_path / "train" / "model").glob("model*.safetensors"))  # the adapter alone
    metrics = evaluate_stage.run(
        params,
        tmp_path / "train",
        root / "tokenized",
        tmp_path / "ref_logps",
        root / "normalized",
        root / "base",
        tmp_path / "eval",
        tmp_path / "metrics.json",
    )
    assert 0.0 <= metrics["rewards/accuracies"] <= 1.0 and "win_rate" in metrics

    monkeypatch.setenv("HF_TOKEN", SECRET)
    hub = LocalHub(tmp_path / "hub")
    manifest = export_stage.run(
        params,
        tmp_path / "train",
        root / "normalized",
        root / "base",
        tmp_path / "metrics.json",
        tmp_path / "export",
        api=hub,
    )
    out = tmp_path / "export"
    assert manifest["adapter"] and manifest["merged"]
    assert hub.repos["user/dpo-lora"]["private"] is True and hub.files("user/dpo-lora") == set(manifest["pushed"])
    assert {"adapter/adapter_model.safetensors", "model.safetensors", "README.md"} <= set(manifest["pushed"])
    for path in out.rglob("*"):  # the token is in no artifact
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path

    card = (out / "README.md").read_text()
    assert "LoRA adapter (r=4" in card and "normalized/train.parquet" in card and "rewards/accuracies" in card
    trained = PeftModel.from_pretrained(load_causal_lm(str(root / "base" / "model")), str(tmp_path / "train" / "model"))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (logps(merged, tokenizer) - logps(trained, tokenizer)).abs().max() <= 1e-4

    # offline: the push fails with a clear message, the fresh local export is complete and readable
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PipelineError, match="offline mode is on"):
        export_stage.run(
            params,
            tmp_path / "train",
            root / "normalized",
            root / "base",
            tmp_path / "metrics.json",
            tmp_path / "export2",
        )
    assert read_manifest(tmp_path / "export2", "export")["merged"] is True
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "export2") is not None
