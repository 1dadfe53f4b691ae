"""The base artifact: which model the run starts from, which reference it compares with, which adapter it continues.

The `base` stage records each as a source (a local directory with its file digests, or a Hub id with the
revision asked for and the commit it resolved to); every later stage loads models through these records
(`pipeline.model.loading`), at the recorded commit, so a branch that moves on the Hub cannot change a run between
stages, and this artifact is the one place that says where the models come from.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from pipeline.builtin import BUILTIN_MODELS
from pipeline.core.errors import PipelineError
from pipeline.core.integrity import files_problem
from pipeline.store.artifacts import read_manifest
from pipeline.store.digests import file_digest
from pipeline.store.dvc_deps import require_dvc_deps
from pipeline.store.hub import resolve_commit

MODEL_SUBDIR = "model"  # the built-in model (and its tokenizer or processor) inside the base artifact


def describe_source(name: str, revision: str | None, key: str, revision_key: str | None = None) -> dict:
    """Record a model or adapter source: a local directory with its file digests, or a Hub id with the revision
    asked for and the commit it resolved to (None when offline and not in the local Hub cache)."""
    path = Path(name)
    if path.is_dir():
        require_dvc_deps([(key, name, [path])])  # under `dvc repro`: a local model must be a dep of the base stage
        files = {str(p.relative_to(path)): file_digest(p) for p in sorted(path.rglob("*")) if p.is_file()}
        if not any(f.endswith((".safetensors", ".bin")) for f in files):
            raise PipelineError(f"{key}={name}: the directory holds no weights (*.safetensors / *.bin).")
        problem = files_problem(path)
        if problem:
            raise PipelineError(
                f"{key}={name}: {problem}: the file is damaged or incomplete (a cut download or copy); "
                "copy or download the model again."
            )
        # as given: a relative path reads the same folder of a clone made elsewhere
        return {"source": path.as_posix(), "revision": None, "source_files": files}
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise PipelineError(
            f"{key}={name}: no such local directory, and not a Hub id (namespace/name); "
            "give an existing directory or a Hub model id."
        ) from None
    return {
        "source": name,
        "revision": revision,
        "commit": resolve_commit(name, revision, "model", key=key, revision_key=revision_key),
    }


def describe_external_base(params: dict) -> dict:
    return describe_source(
        params["model"]["name_or_path"], params["model"]["revision"], "model.name_or_path", "model.revision"
    )


def describe_reference_and_adapter(params: dict) -> dict:
    """The base manifest's record of an explicit reference model and of an adapter to continue, when set."""
    cfg, info = params["model"], {}
    if cfg["ref_name_or_path"]:
        info["reference"] = describe_source(
            cfg["ref_name_or_path"], cfg["ref_revision"], "model.ref_name_or_path", "model.ref_revision"
        )
    if cfg["adapter"]:
        adapter = describe_source(cfg["adapter"], None, "model.adapter")
        local_files = adapter.get("source_files")  # (a Hub adapter's files are checked when it is loaded)
        if local_files is not None and "adapter_config.json" not in local_files:
            raise PipelineError(
                f"model.adapter={cfg['adapter']}: no adapter_config.json there; give a PEFT adapter "
                "directory (as saved by train with model.peft.enabled) or a Hub adapter id."
            )
        info["adapter"] = adapter
    return info


def load_revision(entry: dict) -> str | None:
    """The revision to load a recorded source at: its resolved commit when known, else the revision asked for."""
    return entry.get("commit") or entry["revision"]


def require_local_files(entry: dict, base_dir: Path) -> None:
    """A local model the base artifact recorded still has every file it recorded (names only: digesting the weights
    again at every stage would cost as much as loading them)."""
    if source_kind(entry) != "local":
        return
    folder = Path(entry["source"])
    missing = [name for name in entry["source_files"] if not (folder / name).is_file()]
    if missing:
        gone = "the folder is gone" if not folder.is_dir() else f"{', '.join(sorted(missing)[:3])} missing"
        raise PipelineError(
            f"{folder}: the local model {base_dir} recorded has changed since ({gone}); restore it, "
            "or run `dvc repro base` (or `dpo base`) to record what is there now."
        )


def base_source(base_dir: Path) -> tuple[str, str | None]:
    """(name or path, revision) to load the base model and tokenizer from; for a Hub id, the recorded commit."""
    manifest = read_manifest(base_dir, "base")
    if manifest["source"] in BUILTIN_MODELS:
        return str(Path(base_dir) / MODEL_SUBDIR), None
    require_local_files(manifest, base_dir)
    return manifest["source"], load_revision(manifest)


def source_kind(entry: dict) -> str:
    """What a recorded model source is: 'builtin' (built in code), 'local' (a directory: its record holds the file
    digests) or 'hub' (a Hub id)."""
    if entry["source"] in BUILTIN_MODELS:
        return "builtin"
    return "local" if "source_files" in entry else "hub"


def _recorded_source(base_dir: Path, key: str) -> tuple[str, str | None] | None:
    entry = read_manifest(base_dir, "base").get(key)
    if entry is not None:
        require_local_files(entry, base_dir)
    return None if entry is None else (entry["source"], load_revision(entry))


def reference_source(base_dir: Path) -> tuple[str, str | None] | None:
    """The explicit reference model recorded by the base stage (model.ref_name_or_path), or None."""
    return _recorded_source(base_dir, "reference")


def adapter_source(base_dir: Path) -> tuple[str, str | None] | None:
    """The adapter to continue training recorded by the base stage (model.adapter), or None."""
    return _recorded_source(base_dir, "adapter")


# ---- iterative rounds: a round's base artifact names the policy the round starts from ------------------------

MODEL_RECORD_KEYS = ("source", "revision", "commit", "source_files")


def model_record(base_dir: Path, manifest: dict, key: str) -> dict:
    """The record of the model a base artifact holds or names: a built-in one as the local folder inside it."""
    if manifest["source"] in BUILTIN_MODELS:
        return describe_source(str(Path(base_dir) / MODEL_SUBDIR), None, key)
    return {k: manifest[k] for k in MODEL_RECORD_KEYS if k in manifest}


def round_base_record(round_name: str, previous: Path, previous_manifest: dict, initial: Path, reference: str) -> dict:
    """The base record of iterative round `round_name`: the policy it starts from is the previous round's trained
    model (`previous` is a train artifact), or the initial model for the first round (`previous` is the initial base
    artifact); its reference is that starting policy (`reference` previous: nothing recorded, the initial policy is
    the reference) or the initial model (`reference` initial). A LoRA round's policy is the base model carrying the
    adapter the round before trained (`adapter`: training continues it). An explicit reference
    (model.ref_name_or_path) the initial base recorded stays every round's reference."""
    initial_manifest = read_manifest(initial, "base")
    initial_model = model_record(initial, initial_manifest, "the initial model")
    if previous_manifest["stage"] == "base":
        record = {k: v for k, v in initial_manifest.items() if k in ("adapter", "reference")}
        record.update(initial_model)
    else:
        model_dir = Path(previous) / "model"
        trained = describe_source(str(model_dir), None, f"the policy of the round before {round_name}")
        if (model_dir / "adapter_config.json").exists():  # a LoRA round: the base model, carrying that adapter
            record = {**initial_model, "adapter": trained}
        else:
            record = trained
        if "reference" in initial_manifest:
            record["reference"] = initial_manifest["reference"]
    if reference == "initial" and "reference" not in record and "adapter" not in record:
        if previous_manifest["stage"] != "base":  # (an adapter's initial model is the base with the adapter off)
            record["reference"] = initial_model
    record["round"] = {"name": round_name, "previous": str(previous), "reference": reference}
    return record


def round_reference(base_dir: Path) -> str | None:
    """iterate.reference of the iterative round whose base artifact this is (previous or initial); None outside
    rounds."""
    return (read_manifest(base_dir, "base").get("round") or {}).get("reference")
