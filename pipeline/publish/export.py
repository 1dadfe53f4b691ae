"""export: the trained model as a self-contained HF directory with a model card; opt-in Hub push.

For an adapter the export holds both the adapter alone (`adapter/`, loadable with peft on the base
model) and, by default, the full model with the adapter merged into the full-precision base (the
directory itself, loadable with `AutoModelForCausalLM.from_pretrained`, or for a vision-language model with
`AutoModelForImageTextToText` and its processor with `AutoProcessor`). The Hub token is read from
the environment (HF_TOKEN) or the huggingface_hub login, passed only to `HfApi`, and never written
to a message, a log or an artifact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import yaml

from pipeline.config.params import train_option
from pipeline.core.errors import PipelineError
from pipeline.core.redaction import redact
from pipeline.data.processing import is_processor
from pipeline.model.loading import is_adapter_dir, is_vision_model, load_causal_lm, load_tokenizer, load_trained_model
from pipeline.store.artifacts import manifest_digest
from pipeline.store.hub import hub_token, push_failure, with_tries

ADAPTER_SUBDIR = "adapter"

CARD_TEMPLATE = """
# {title}

Trained with Direct Preference Optimization ([Rafailov et al., 2023](https://arxiv.org/abs/2305.18290))
by the dpo-pipeline project.

- Base model: {base_description}
- Weights: {weights}
- Loss types: {loss_types} (weights {loss_weights}), beta = {beta}
- Training data: `{data_source}`

## Data digests (sha256)

{data_table}

## Evaluation (held-out pairs)

{metrics_table}

## Parameters

```yaml
{params_yaml}```
"""


def _table(header: tuple[str, str], rows: dict) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    for key, value in sorted(rows.items()):
        lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    return "\n".join(lines) if rows else "(none recorded)"


def base_model_kind(name: str) -> str:
    """Where a base model named `name` comes from: 'builtin' (built in code), 'local' (a directory, or a name that is
    no valid Hub repo id) or 'hub' (a Hub repo id, with no local directory of that name shadowing it)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith("builtin:"):
        return "builtin"
    if Path(name).is_dir():
        return "local"
    try:
        validate_repo_id(name)
    except HFValidationError:
        return "local"
    return "hub"


def _base_description(base_model: str, kind: str, base_revision: str | None) -> str:
    if kind == "hub":
        return f"`{base_model}`" + (f" (revision `{base_revision}`)" if base_revision else "")
    if kind == "builtin":
        return (
            f"dpo-pipeline's built-in model `{base_model}` (a tiny model built in code, warm-started by the "
            f"`base` stage; not on the Hugging Face Hub)"
        )
    return f"a local directory, `{base_model}` (not on the Hugging Face Hub)"


def model_card(
    title: str,
    base_model: str,
    params: dict,
    metrics: dict,
    data_digests: dict[str, str] | str,
    base_revision: str | None = None,
    adapter: dict | None = None,
    merged: bool = False,
    base_kind: str | None = None,
) -> str:
    """The model card: base model, weights kind (adapter/merged/full), loss types, data digests, eval metrics, params.

    The metadata's `base_model` (which the Hub links to a model page) is written only for a Hub base; a built-in or
    local base is named in the card's text instead. `base_kind` ('hub', 'local', 'builtin'; the base artifact knows)
    defaults to `base_model_kind(base_model)`."""
    loss_types = train_option(params, "loss_type")
    loss_types = loss_types if isinstance(loss_types, list) else [loss_types]
    if isinstance(data_digests, str):
        data_digests = {"normalized": data_digests}
    from huggingface_hub import ModelCard, ModelCardData

    tags = ["dpo", "preference-optimization"] + (["peft", "lora"] if adapter else [])
    base_kind = base_kind or base_model_kind(base_model)
    card_data = ModelCardData(
        tags=tags, library_name="transformers", base_model=base_model if base_kind == "hub" else None
    )
    if adapter:
        lora = ", ".join(
            f"{k}={adapter[k]}" for k in ("r", "lora_alpha", "lora_dropout", "target_modules") if k in adapter
        )
        weights = f"LoRA adapter ({lora}) in `{ADAPTER_SUBDIR}/`" + (
            "; the full model with the adapter merged at the top level" if merged else ""
        )
    else:
        weights = "full fine-tuned model"
    body = CARD_TEMPLATE.format(
        title=title,
        base_description=_base_description(base_model, base_kind, base_revision),
        weights=weights,
        loss_types=", ".join(loss_types),
        loss_weights=train_option(params, "loss_weights") or "all 1.0",
        beta=train_option(params, "beta"),
        data_source=params["data"]["train"],
        data_table=_table(("artifact", "digest"), data_digests),
        metrics_table=_table(("metric", "value"), metrics),
        params_yaml=yaml.safe_dump(redact(params), sort_keys=True),
    )
    # huggingface_hub writes the metadata block the Hub reads (tags, library, base model)
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}"))


def export_model(
    model_dir: Path,
    out_dir: Path,
    merge_adapter: bool = True,
    load_base: Callable[[], object] | None = None,
    base_name: str | None = None,
    base_revision: str | None = None,
) -> dict:
    """Write the trained model and its tokenizer to `out_dir`.

    A full model is re-saved as safetensors. An adapter goes to `out_dir/adapter` (its config naming
    `base_name`/`base_revision` when given) and, if `merge_adapter`, is merged into the base from
    `load_base()` (default: the base its adapter_config names) and saved at the top of `out_dir`.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not is_adapter_dir(model_dir):
        load_causal_lm(str(model_dir)).save_pretrained(out_dir, safe_serialization=True)
        load_tokenizer(str(model_dir)).save_pretrained(out_dir)  # a vision-language model's processor, whole
        return {"adapter": False, "merged": False}

    model = load_trained_model(model_dir, base_model=load_base() if load_base is not None else None)
    tokenizer = processing_class_for_adapter(model_dir, model)
    adapter_dir = out_dir / ADAPTER_SUBDIR
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    if base_name is not None:  # point the adapter at the real base, not this run's local copy
        config_path = adapter_dir / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config.update({"base_model_name_or_path": base_name, "revision": base_revision})
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    lora = model.peft_config[model.active_adapter].to_dict()
    adapter = {
        k: (sorted(v) if isinstance(v, set) else v)
        for k, v in lora.items()
        if k in ("r", "lora_alpha", "lora_dropout", "target_modules", "peft_type")
    }
    if merge_adapter:
        merged = model.merge_and_unload()
        merged.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    return {"adapter": adapter, "merged": merge_adapter}


def processing_class_for_adapter(model_dir: Path, model):
    """The processing class saved with an adapter: its own directory's, or for a vision-language model whose
    adapter directory holds only the tokenizer, the base's processor."""
    processing_class = load_tokenizer(str(model_dir))
    if is_vision_model(model) and not is_processor(processing_class):
        processing_class = load_tokenizer(model.peft_config[model.active_adapter].base_model_name_or_path)
    return processing_class


# ---- the Hub -----------------------------------------------------------------------------------


def push_to_hub(folder: Path, repo_id: str | None, private: bool = True, api=None) -> list[str]:
    """Upload `folder` (all but its manifest) to the Hub model repo `repo_id`, private by default.

    Returns the uploaded paths. `api` is an `HfApi`-like object (tests pass a local stand-in); by
    default `HfApi` with the token from the environment. Every failure (offline, unauthenticated,
    refused, unreachable) is a PipelineError saying what to fix; the local export is left as it is.
    """
    folder = Path(folder)
    intact = f"The local export in {folder} is intact."
    if not repo_id:
        raise PipelineError("export.push.enabled is true but export.push.repo_id is not set; set it to 'user/name'.")
    token = hub_token()
    if api is None:
        if not token:
            raise PipelineError(
                f"push to the Hub repo {repo_id!r}: not authenticated: no Hub token. Set HF_TOKEN in the "
                f"environment to a token with write access (or run `hf auth login`). {intact}"
            )
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    paths = sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"
    )
    try:
        with_tries(
            f"creating the Hub repo {repo_id!r}",
            lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
        )
        with_tries(
            f"uploading {folder} to the Hub repo {repo_id!r}",
            lambda: api.upload_folder(
                folder_path=str(folder),
                repo_id=repo_id,
                repo_type="model",
                allow_patterns=paths,
                commit_message="Upload DPO model",
            ),
        )
    except PipelineError as err:  # no answer within the tries
        raise PipelineError(f"push to the Hub repo {repo_id!r} failed: {err} {intact}") from None
    except Exception as err:
        raise PipelineError(f"push to the Hub repo {repo_id!r} failed: {push_failure(err, token)} {intact}") from None
    return paths


def data_digests(normalized: Path, manifest: dict) -> dict[str, str]:
    """The normalized data's identity for the model card: its manifest digest and each split file's digest."""
    return {
        "normalized/manifest.json": manifest_digest(normalized),
        **{f"normalized/{name}": digest for name, digest in manifest["files"].items() if name.endswith(".parquet")},
    }
