"""The base artifact: which model the run starts from, which reference it compares with, which adapter it continues.

The `base` stage records each as a source (a local directory with its file digests, or a Hub id at a
resolved commit); every later stage loads models through these records (`pipeline.models`), so this
artifact is the one place that says where the models come from.
"""

from __future__ import annotations

from pathlib import Path

from .artifacts import file_digest, read_manifest
from .builtin import BUILTIN_MODEL
from .builtin.warm_start import MODEL_SUBDIR
from .errors import PipelineError


def describe_source(name: str, revision: str | None, key: str) -> dict:
    """Record a model or adapter source: a local directory with its file digests, or a Hub id at a resolved commit."""
    path = Path(name)
    if path.is_dir():
        files = {str(p.relative_to(path)): file_digest(p) for p in sorted(path.rglob("*")) if p.is_file()}
        if not any(f.endswith((".safetensors", ".bin")) for f in files):
            raise PipelineError(f"{key}={name}: the directory holds no weights (*.safetensors / *.bin).")
        return {"source": str(path.resolve()), "revision": None, "source_files": files}
    try:
        from huggingface_hub import HfApi
        info = HfApi().model_info(name, revision=revision)
    except Exception as err:
        raise PipelineError(f"{key}={name!r}: not a local directory and the Hub lookup failed "
                            f"({type(err).__name__}: {err}). Check the id and the network, or use a local directory.") from None
    return {"source": name, "revision": info.sha, "source_files": {s.rfilename: None for s in info.siblings or []}}


def describe_external_base(params: dict) -> dict:
    return describe_source(params["model"]["name_or_path"], params["model"]["revision"], "model.name_or_path")


def describe_reference_and_adapter(params: dict) -> dict:
    """The base manifest's record of an explicit reference model and of an adapter to continue, when set."""
    cfg, info = params["model"], {}
    if cfg["ref_name_or_path"]:
        info["reference"] = describe_source(cfg["ref_name_or_path"], cfg["ref_revision"], "model.ref_name_or_path")
    if cfg["adapter"]:
        adapter = describe_source(cfg["adapter"], None, "model.adapter")
        if adapter["revision"] is None and "adapter_config.json" not in adapter["source_files"]:
            raise PipelineError(f"model.adapter={cfg['adapter']}: no adapter_config.json there; give a PEFT adapter "
                                "directory (as saved by train with model.peft.enabled) or a Hub adapter id.")
        info["adapter"] = adapter
    return info


def base_source(base_dir: Path) -> tuple[str, str | None]:
    """(name or path, revision) to load the base model and tokenizer from."""
    manifest = read_manifest(base_dir, "base")
    if manifest["source"] == BUILTIN_MODEL:
        return str(Path(base_dir) / MODEL_SUBDIR), None
    return manifest["source"], manifest["revision"]


def _recorded_source(base_dir: Path, key: str) -> tuple[str, str | None] | None:
    entry = read_manifest(base_dir, "base").get(key)
    return None if entry is None else (entry["source"], entry["revision"])


def reference_source(base_dir: Path) -> tuple[str, str | None] | None:
    """The explicit reference model recorded by the base stage (model.ref_name_or_path), or None."""
    return _recorded_source(base_dir, "reference")


def adapter_source(base_dir: Path) -> tuple[str, str | None] | None:
    """The adapter to continue training recorded by the base stage (model.adapter), or None."""
    return _recorded_source(base_dir, "adapter")
