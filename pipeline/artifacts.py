"""Artifact directories: atomic writes, manifests written last, and checks of what a stage reads.

Every stage writes into a temporary sibling directory and renames it into place only after its
`manifest.json` (schema version, stage, input digests, params, row counts, file digests) is written,
so a killed stage never leaves something that looks complete. A reader refuses a directory whose
manifest is missing, of another schema version, or made from other inputs, and names the stage to re-run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from .errors import PipelineError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

# which stage produces which artifact, for "re-run X" messages
PRODUCER = {"base": "base", "normalized": "normalize", "tokenized": "tokenize", "ref_logps": "ref-logps",
            "train": "train", "eval": "evaluate", "export": "export"}


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def params_digest(params: Any) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


def write_json(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `final` only if the block finishes.

    On an exception the temporary directory is removed and any earlier `final` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not (tmp / MANIFEST).exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"internal error: {final} was staged without a manifest")
    old = final.with_name(final.name + f".old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_manifest(directory: Path, stage: str, inputs: dict[str, str], params: Any,
                   rows: dict[str, int] | None = None, extra: dict | None = None) -> dict:
    """Write `manifest.json` last: it lists every other file in `directory` with its digest."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): file_digest(p)
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {"schema_version": SCHEMA_VERSION, "stage": stage, "inputs": inputs,
                "params": params, "params_digest": params_digest(params), "rows": rows or {},
                "files": files, **(extra or {})}
    write_json(directory / MANIFEST, manifest)
    return manifest


def manifest_digest(directory: Path) -> str:
    """The identity of an artifact: the digest of its manifest (which digests every file in it)."""
    return file_digest(Path(directory) / MANIFEST)


def read_manifest(directory: Path, kind: str) -> dict:
    """Read and check the manifest of an artifact of `kind` (a key of PRODUCER)."""
    directory = Path(directory)
    rerun = f"run `dpo {PRODUCER[kind]}` (or `dvc repro {PRODUCER[kind]}`)"
    path = directory / MANIFEST
    if not path.exists():
        raise PipelineError(f"{directory}: no {MANIFEST}, so this {kind} artifact is missing or incomplete; {rerun}.")
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise PipelineError(f"{path}: schema version {manifest.get('schema_version')} but this pipeline reads "
                            f"version {SCHEMA_VERSION}; {rerun}.")
    if manifest.get("stage") != PRODUCER[kind]:
        raise PipelineError(f"{path}: written by stage {manifest.get('stage')!r}, expected a {kind} artifact "
                            f"from {PRODUCER[kind]!r}; check the path or {rerun}.")
    return manifest


def require_same_input(manifest: dict, directory: Path, input_name: str, expected_digest: str, kind: str) -> None:
    """Refuse an artifact made from another version of `input_name` than the one it is paired with."""
    got = manifest["inputs"].get(input_name)
    if got != expected_digest:
        raise PipelineError(
            f"{directory}: this {kind} artifact was made from another {input_name} artifact than the one given "
            f"(digest {str(got)[:12]} vs {expected_digest[:12]}); it is stale: run `dpo {PRODUCER[kind]}` "
            f"(or `dvc repro {PRODUCER[kind]}`) again."
        )


@dataclasses.dataclass
class StageOutput:
    """What a stage fills in while its output directory is staged: files go under `dir`; `rows`, `extra`
    and `inputs` (digests of non-artifact inputs, e.g. a hook file) go into the manifest written last."""

    dir: Path
    manifests: dict[str, dict]
    rows: dict[str, int] = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)
    manifest: dict | None = None


@contextlib.contextmanager
def stage_output(stage: str, out: Path, inputs: dict[str, Path], params: Any) -> Iterator[StageOutput]:
    """A stage's frame: read and check the manifests of its input artifacts (`inputs`: artifact kind → directory),
    stage the output directory, and, when the block finishes, write the manifest last (input digests, params,
    rows) and rename the directory into place. On an error nothing is renamed and the old output stays."""
    manifests = {kind: read_manifest(path, kind) for kind, path in inputs.items()}
    digests = {kind: manifest_digest(path) for kind, path in inputs.items()}
    with staged_dir(out) as tmp:
        output = StageOutput(Path(tmp), manifests)
        yield output
        output.manifest = write_manifest(tmp, stage, inputs={**digests, **output.inputs}, params=params,
                                         rows=output.rows, extra=output.extra)
