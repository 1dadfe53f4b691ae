"""Export of adapters (alone and merged), the model card, and the Hub push against a local stand-in."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import reference_logps
from pipeline.core.errors import PipelineError
from pipeline.model.collator import DataCollatorForPreference
from pipeline.objective.reference import Reference
from pipeline.publish.export import export_model, model_card, push_to_hub

SECRET = "hf_dpoPipelineTestSecret0123456789"
PAIRS = [
    {"row_id": str(i), "prompt_ids": [2, 5, 10 + i, 11], "chosen_ids": [20 + i, 21, 3], "rejected_ids": [30, 31 + i, 3]}
    for i in range(6)
]


def logps(model, tokenizer) -> torch.Tensor:
    out = reference_logps(Reference("policy", model, ""), PAIRS, DataCollatorForPreference(tokenizer.pad_token_id), 8)
    return torch.tensor([out["ref_chosen_logps"], out["ref_rejected_logps"]])


@pytest.fixture
def adapter_run(tmp_path, tiny_model, tiny_tokenizer):
    """A base model directory and a trained-looking LoRA adapter directory (non-zero B) on it."""
    from peft import LoraConfig, get_peft_model

    base_dir, model_dir = tmp_path / "base", tmp_path / "model"
    tiny_model.save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    peft_model = get_peft_model(
        tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    return base_dir, model_dir


def load_base(base_dir):
    from pipeline.model.loading import load_causal_lm

    return lambda: load_causal_lm(str(base_dir), {"dtype": "float32"})


def test_adapter_export_holds_the_adapter_and_a_merged_model_with_the_same_logps(tmp_path, adapter_run, tiny_tokenizer):
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, model_dir = adapter_run
    out = tmp_path / "export"
    kind = export_model(
        model_dir, out, load_base=load_base(base_dir), base_name="org/base-model", base_revision="abc123"
    )
    assert kind["merged"] and kind["adapter"]["r"] == 4
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("org/base-model", "abc123")
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "model.safetensors").exists()

    adapter_model = PeftModel.from_pretrained(load_base(base_dir)(), str(model_dir))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    expected = logps(adapter_model, tiny_tokenizer)
    assert (logps(merged, tiny_tokenizer) - expected).abs().max() <= 1e-4
    assert (logps(load_base(base_dir)(), tiny_tokenizer) - expected).abs().max() > 1e-3  # the adapter matters
    # and the adapter alone, loaded by peft on the base, is the same model
    alone = PeftModel.from_pretrained(load_base(base_dir)(), str(out / "adapter"))
    assert (logps(alone, tiny_tokenizer) - expected).abs().max() <= 1e-6


def test_adapter_export_without_merging_and_full_model_export(tmp_path, adapter_run, tiny_model, tiny_tokenizer):
    base_dir, model_dir = adapter_run
    kind = export_model(model_dir, tmp_path / "alone", merge_adapter=False, load_base=load_base(base_dir))
    assert kind["merged"] is False and (tmp_path / "alone" / "adapter" / "adapter_config.json").exists()
    assert not list((tmp_path / "alone").glob("*.safetensors"))
    kind = export_model(base_dir, tmp_path / "full")
    assert kind == {"adapter": False, "merged": False} and (tmp_path / "full" / "model.safetensors").exists()


def test_model_card_records_base_data_params_losses_and_metrics():
    from pipeline.config.params import check_params

    params = check_params({"train": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "beta": 0.2}})
    card = model_card(
        "user/dpo-model",
        "org/base-model",
        params,
        {"rewards/accuracies": 0.875, "win_rate": 0.9},
        {"normalized/train.parquet": "ab" * 32},
        base_revision="abc123",
        adapter={"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
        merged=True,
    )
    for text in (
        "base_model: org/base-model",
        "revision `abc123`",
        "sigmoid, sft",
        "[1.0, 0.5]",
        "beta = 0.2",
        "| normalized/train.parquet | " + "ab" * 32,
        "| rewards/accuracies | 0.8750 |",
        "| win_rate | 0.9000 |",
        "LoRA adapter (r=8, lora_alpha=16, target_modules=all-linear)",
        "merged",
        "builtin:sentiment",
        "- peft",
        "learning_rate",
    ):
        assert text in card, text


def _card_metadata(card: str) -> dict:
    import yaml

    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.parametrize(
    "base, kind, described",
    [
        ("builtin:tiny-llama", None, "dpo-pipeline's built-in model `builtin:tiny-llama`"),
        ("builtin:tiny-llama", "builtin", "dpo-pipeline's built-in model `builtin:tiny-llama`"),
        (
            "models/base",
            "local",
            "a local directory, `models/base`",
        ),  # looks like a Hub id, but the manifest says local
        ("/data/models/base", None, "a local directory, `/data/models/base`"),
    ],
)
def test_the_model_card_names_a_builtin_or_local_base_in_its_text_not_as_a_hub_base_model(base, kind, described):
    from pipeline.config.params import check_params

    card = model_card("DPO model", base, check_params({}), {}, "ab" * 32, base_kind=kind)
    metadata = _card_metadata(card)
    assert "base_model" not in metadata and "dpo" in metadata["tags"], metadata
    assert f"- Base model: {described}" in card and "not on the Hugging Face Hub" in card, card


def test_the_model_card_names_a_hub_base_as_base_model(tmp_path, monkeypatch):
    from pipeline.config.params import check_params

    monkeypatch.chdir(tmp_path)  # no local directory of that name
    card = model_card("DPO model", "org/base-model", check_params({}), {}, "ab" * 32, base_revision="abc123")
    assert _card_metadata(card)["base_model"] == "org/base-model"
    assert "- Base model: `org/base-model` (revision `abc123`)" in card
    (tmp_path / "org" / "base-model").mkdir(parents=True)  # a local directory shadows the Hub id, as when loading
    assert "base_model" not in _card_metadata(
        model_card("DPO model", "org/base-model", check_params({}), {}, "ab" * 32)
    )


# ---- the Hub push -------------------------------------------------------------------------------------


class LocalHub:
    """A local stand-in for `huggingface_hub.HfApi`: a repo is a folder; upload_folder selects files with the
    client's own pattern filter, as the Hub client does."""

    def __init__(self, root: Path):
        self.root, self.repos = Path(root), {}

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        if repo_id in self.repos and not exist_ok:
            raise FileExistsError(repo_id)
        self.repos[repo_id] = {"private": private, "repo_type": repo_type}
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)

    def upload_folder(self, folder_path, repo_id, repo_type=None, allow_patterns=None, commit_message=None):
        from huggingface_hub.utils import filter_repo_objects

        assert repo_id in self.repos, "upload before create_repo"
        folder = Path(folder_path)
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        for rel in filter_repo_objects(files, allow_patterns=allow_patterns):
            target = self.root / repo_id / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / rel, target)

    def files(self, repo_id) -> set[str]:
        return {p.relative_to(self.root / repo_id).as_posix() for p in (self.root / repo_id).rglob("*") if p.is_file()}


@pytest.fixture
def exported(tmp_path, adapter_run):
    base_dir, model_dir = adapter_run
    out = tmp_path / "export"
    export_model(model_dir, out, load_base=load_base(base_dir))
    (out / "README.md").write_text("card\n")
    (out / "manifest.json").write_text("{}\n")
    return out


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_uploads_the_export_privately_without_its_manifest(tmp_path, exported):
    hub = LocalHub(tmp_path / "hub")
    pushed = push_to_hub(exported, "user/dpo-model", api=hub)
    assert hub.repos == {"user/dpo-model": {"private": True, "repo_type": "model"}}
    assert hub.files("user/dpo-model") == set(pushed) == set(tree(exported)) - {"manifest.json"}
    assert {
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    } <= set(pushed)
    push_to_hub(exported, "user/public-model", private=False, api=hub)
    assert hub.repos["user/public-model"]["private"] is False
    with pytest.raises(PipelineError, match="repo_id is not set"):
        push_to_hub(exported, None, api=hub)


def test_push_failures_never_show_the_token(monkeypatch, exported):
    class Refused:
        status_code = 401

    class RefusingHub:
        def create_repo(self, *args, **kwargs):
            err = RuntimeError(f"401 Client Error: Unauthorized (Authorization: Bearer {SECRET})")
            err.response = Refused()
            raise err

    monkeypatch.setenv("HF_TOKEN", SECRET)
    with pytest.raises(PipelineError) as info:
        push_to_hub(exported, "user/dpo-model", api=RefusingHub())
    assert "refused the credentials (HTTP 401)" in str(info.value) and "intact" in str(info.value)
    assert SECRET not in str(info.value) and "***" in str(info.value)


def test_offline_push_fails_clearly_for_real_and_leaves_the_export_intact(monkeypatch, exported):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    before = tree(exported)
    with pytest.raises(PipelineError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\)") as info:
        push_to_hub(exported, "user/dpo-model")  # the real HfApi
    assert f"local export in {exported} is intact" in str(info.value) and SECRET not in str(info.value)
    assert tree(exported) == before


def test_unreachable_hub_and_missing_token_fail_clearly(monkeypatch, tmp_path, exported):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_TOKEN", SECRET)
    with pytest.raises(PipelineError, match="could not be reached") as info:
        push_to_hub(exported, "user/dpo-model")
    assert SECRET not in str(info.value)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(PipelineError, match="not authenticated: no Hub token. Set HF_TOKEN"):
        push_to_hub(exported, "user/dpo-model")
