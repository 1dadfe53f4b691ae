"""export: the trained model as a self-contained HF directory with a model card; opt-in Hub push."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from .errors import PipelineError

CARD_TEMPLATE = """---
{front_matter}---

# {title}

Trained with Direct Preference Optimization ([Rafailov et al., 2023](https://arxiv.org/abs/2305.18290))
by the dpo-pipeline project.

- Base model: `{base_model}`
- Loss types: {loss_types} (weights {loss_weights}), beta = {beta}
- Training data: `{data_source}` (normalized data digest `{data_digest}`)

## Evaluation (held-out pairs)

{metrics_table}

## Training parameters

```yaml
{params_yaml}```
"""


def model_card(title: str, base_model: str, params: dict, metrics: dict, data_digest: str) -> str:
    train = params["train"]
    front = {"tags": ["dpo", "preference-optimization"], "library_name": "transformers", "base_model": base_model}
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, (int, float)) else f"| {k} | {v} |" for k, v in sorted(metrics.items()))
    return CARD_TEMPLATE.format(
        front_matter=yaml.safe_dump(front, sort_keys=False), title=title, base_model=base_model,
        loss_types=", ".join(train.get("loss_type", ["sigmoid"]) if isinstance(train.get("loss_type", ["sigmoid"]), list) else [train["loss_type"]]),
        loss_weights=train.get("loss_weights") or "all 1.0", beta=train.get("beta", 0.1),
        data_source=params["data"]["train"], data_digest=data_digest[:16],
        metrics_table="| metric | value |\n|---|---|\n" + rows, params_yaml=yaml.safe_dump(params, sort_keys=True))


def export_model(model_dir: Path, out_dir: Path, merge_adapter: bool = True) -> dict:
    """Write the model (merged when it is an adapter and `merge_adapter`), its adapter and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if (model_dir / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained(model_dir)
        model.save_pretrained(out_dir / "adapter")
        tokenizer.save_pretrained(out_dir / "adapter")
        if not merge_adapter:
            return {"adapter": True, "merged": False}
        model = model.merge_and_unload()
        kind = {"adapter": True, "merged": True}
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        kind = {"adapter": False, "merged": False}
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return kind


def push_to_hub(folder: Path, repo_id: str | None, private: bool = True, api=None) -> list[str]:
    """Upload `folder` to the Hub repo `repo_id`; returns the uploaded paths.

    The token comes from the environment (HF_TOKEN) or the huggingface_hub login, and is never logged.
    `api` is an `HfApi`-like object (tests pass a local stand-in).
    """
    if not repo_id:
        raise PipelineError("export.push.enabled is true but export.push.repo_id is not set; set it to 'user/name'.")
    if api is None:
        from huggingface_hub import HfApi
        api = HfApi(token=os.environ.get("HF_TOKEN"))
    paths = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file() and p.name != "manifest.json")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          allow_patterns=paths, commit_message="Upload DPO model")
    except Exception as err:
        message = str(err).replace(os.environ.get("HF_TOKEN") or "\0", "***")
        raise PipelineError(f"push to the Hub repo {repo_id!r} failed ({type(err).__name__}: {message}). The local export in "
                            f"{folder} is intact. Check the network and that HF_TOKEN holds a token with write access.") from None
    return paths


def read_metrics(path: Path) -> dict:
    return json.loads(Path(path).read_text()) if Path(path).exists() else {}
