"""Artifact directories: atomic writes, manifests written last, and checks of what a stage reads.

Every stage writes into a temporary sibling directory and renames it into place only after its
`manifest.json` (schema version, stage, its inputs' identities and paths, params, row counts, where it ran, file
digests) is written, so a killed stage never leaves something that looks complete. Before a stage
reads its inputs it checks them (`check_inputs`):

- each input's manifest exists, is of this schema version and comes from the expected stage;
- every file the manifest lists has the digest it was written with, and there is no other file
  (streamed sha256: one pass over the bytes, small next to loading them);
- lineage: every artifact upstream of the inputs, back to the source data, is the one they were
  made from (re-normalizing without re-tokenizing is refused), and a local data source still has
  the digest normalize recorded.

A refusal names the artifact and the stage to re-run.
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

from pipeline.core.distributed import barrier, broadcast, is_main
from pipeline.core.environment import environment
from pipeline.core.errors import PipelineError
from pipeline.core.redaction import redact
from pipeline.store.digests import file_digest, source_digest
from pipeline.store.stage_list import PRODUCER, PRODUCERS

SCHEMA_VERSION = 2  # 2: inputs record {digest, path}; file digests and lineage are checked on read
MANIFEST = "manifest.json"
MANIFEST_KEYS = ("schema_version", "stage", "inputs", "params", "files")  # what every reader of a manifest may use


def params_digest(params: Any) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


def write_text(path: Path, text: str) -> None:
    """Write a file through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path, what: str, fix: str) -> Any:
    """The JSON in `path`; a file that cannot be read or parsed (truncated, overwritten, not UTF-8) is a
    PipelineError naming it as `what` and saying `fix`."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise PipelineError(
            f"{path}: {what} is damaged: it cannot be read as JSON ({type(err).__name__}: {err}); {fix}."
        ) from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans(final: Path) -> None:
    """Remove `final`'s staging leftovers (`.tmp-PID`, `.old-PID`) of processes that were killed."""
    for sibling in final.parent.glob(f"{final.name}.*-*"):
        kind, _, pid = sibling.name[len(final.name) + 1 :].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(sibling, ignore_errors=True) if sibling.is_dir() else sibling.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `final` only if the block finishes.

    On an exception the temporary directory is removed and any earlier `final` is left untouched. Under several
    processes (`pipeline.core.distributed`) every rank gets rank 0's directory; rank 0 renames it into place once every
    rank has left the block, and the ranks go on together after that.
    """
    final = Path(final)
    main = is_main()
    tmp = None
    if main:
        if final.exists() and not final.is_dir():
            raise PipelineError(
                f"{final}: a file is there, not an artifact folder, and a stage never replaces a file; "
                "move it away, or pass another output path (--out)."
            )
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(final)
        tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    tmp = Path(broadcast(str(tmp) if main else None))
    try:
        yield tmp
    except BaseException:
        if main:  # another rank's failure stops the launch; rank 0's next run removes what it leaves (an orphan)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    if main:
        if not (tmp / MANIFEST).exists():
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"internal error: {final} was staged without a manifest")
        publish(tmp, final)
    barrier()


def publish(tmp: Path, final: Path) -> None:
    """Rename the staged `tmp` to `final` (the previous `final` is set aside, then removed). If a rename fails (a
    read-only or forbidden folder), the previous `final` is put back and `tmp` removed before the error goes on."""
    old = final.with_name(final.name + f".old-{os.getpid()}")
    moved = False
    try:
        if final.exists():
            os.replace(final, old)
            moved = True
        os.replace(tmp, final)
    except BaseException:
        if moved and not final.exists():
            os.replace(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_manifest(
    directory: Path,
    stage: str,
    inputs: dict[str, str],
    params: Any,
    rows: dict[str, int] | None = None,
    extra: dict | None = None,
) -> dict:
    """Write `manifest.json` last: it lists every other file in `directory` with its digest, and where the stage
    ran (`pipeline.core.environment`). Credentials in `params` are recorded as "<redacted>"
    (`pipeline.core.redaction`)."""
    directory = Path(directory)
    params = redact(params)
    files = {
        str(p.relative_to(directory)): file_digest(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "stage": stage,
        "inputs": inputs,
        "params": params,
        "params_digest": params_digest(params),
        "rows": rows or {},
        "files": files,
        "environment": environment(),
        **(extra or {}),
    }
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
    manifest = read_json(path, f"the manifest of this {kind} artifact", f"{rerun} to write it again")
    missing = [key for key in MANIFEST_KEYS if key not in manifest] if isinstance(manifest, dict) else ["every key"]
    if missing:
        raise PipelineError(
            f"{path}: this {kind} artifact is damaged: its manifest lacks {', '.join(missing)}; "
            f"{rerun} to write it again."
        )
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise PipelineError(
            f"{path}: schema version {manifest.get('schema_version')} but this pipeline reads "
            f"version {SCHEMA_VERSION}; {rerun}."
        )
    if manifest.get("stage") not in PRODUCERS[kind]:
        raise PipelineError(
            f"{path}: written by stage {manifest.get('stage')!r}, expected a {kind} artifact "
            f"from {' or '.join(map(repr, PRODUCERS[kind]))}; check the path or {rerun}."
        )
    return manifest


def rerun(kind: str) -> str:
    return f"`dvc repro {PRODUCER[kind]}` (or `dpo {PRODUCER[kind]}`)"


def input_record(directory: Path) -> dict:
    """How a manifest names one input artifact: its identity (manifest digest) and where it was read."""
    return {"digest": manifest_digest(directory), "path": str(directory)}


def input_digest(manifest: dict, kind: str) -> str | None:
    record = manifest.get("inputs", {}).get(kind)
    return record.get("digest") if isinstance(record, dict) else record


def verify_files(directory: Path, manifest: dict, kind: str) -> None:
    """Every file the manifest lists has its recorded digest, and no file was added."""
    directory = Path(directory)
    listed = manifest.get("files", {})
    present = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST}
    for name in sorted(listed):
        path = directory / name
        if name not in present:
            raise PipelineError(
                f"{path}: missing from the {kind} artifact (its manifest lists it); the artifact was "
                f"altered after it was written: run {rerun(kind)} again, or `dvc checkout`."
            )
        if file_digest(path) != listed[name]:
            raise PipelineError(
                f"{path}: its content differs from the digest in {directory / MANIFEST} (the file was "
                f"modified after the stage wrote it); run {rerun(kind)} again, or `dvc checkout` to "
                "restore the cached version."
            )
    added = sorted(present - set(listed))
    if added:
        raise PipelineError(
            f"{directory / added[0]}: not part of the {kind} artifact (its manifest does not list it); "
            f"remove it, or run {rerun(kind)} again."
        )


def require_same_input(manifest: dict, directory: Path, input_name: str, expected_digest: str, kind: str) -> None:
    """Refuse an artifact made from another version of `input_name` than the one it is paired with."""
    got = input_digest(manifest, input_name)
    if got != expected_digest:
        raise PipelineError(
            f"{directory}: this {kind} artifact was made from another {input_name} artifact than the one there now "
            f"(digest {str(got)[:12]} vs {expected_digest[:12]}); it is stale: run {rerun(kind)} again."
        )


def check_sources(directory: Path, manifest: dict) -> None:
    """A normalized artifact's local data sources still have the digests normalize recorded."""
    for role, record in (manifest.get("sources") or {}).items():
        if not record or record.get("kind") != "local" or not record.get("sha256"):
            continue
        try:
            current = source_digest(record["path"])
        except (OSError, PipelineError):
            continue  # the source is gone or moved: nothing to compare with
        if current != record["sha256"]:
            raise PipelineError(
                f"{record['path']} (data.{role}) changed after `normalize` made {directory}; the "
                f"artifacts made from it are stale: run {rerun('normalized')}."
            )


def check_inputs(inputs: dict[str, Path]) -> dict[str, dict]:
    """Check the artifacts a stage reads (`inputs`: kind → directory) and their whole lineage; return their manifests.

    Each input, and every artifact upstream of it that is present, must have its manifest, its files as written,
    and be the very artifact its downstream artifacts were made from. An upstream artifact that is absent (not
    pulled, or removed) cannot contradict anything and is skipped; the stage's own inputs must exist.
    """
    where = {kind: Path(path) for kind, path in inputs.items()}
    manifests: dict[str, dict] = {}
    todo = list(where)
    while todo:
        kind = todo.pop(0)
        if kind in manifests:
            continue
        directory = where[kind]
        manifest = read_manifest(directory, kind)
        verify_files(directory, manifest, kind)
        if kind == "normalized":
            check_sources(directory, manifest)
        manifests[kind] = manifest
        for upstream, record in manifest.get("inputs", {}).items():
            if upstream not in PRODUCER or not isinstance(record, dict):
                continue  # a non-artifact input (e.g. a hook file's digest)
            path = where.setdefault(upstream, Path(record["path"]))
            if not (path / MANIFEST).exists():
                continue
            require_same_input(manifest, directory, upstream, manifest_digest(path), kind)
            todo.append(upstream)
    return {kind: manifests[kind] for kind in inputs}


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
def stage_output(
    stage: str, out: Path, inputs: dict[str, Path], params: Any, aside: dict[str, tuple[str, Path]] | None = None
) -> Iterator[StageOutput]:
    """A stage's frame: check its input artifacts and their lineage (`check_inputs`; `inputs`: artifact kind →
    directory), stage the output directory, and, when the block finishes, write the manifest last (input identities,
    params, rows) and rename the directory into place. On an error nothing is renamed and the old output stays.

    `aside`: more inputs, name → (kind, directory), each checked on its own and recorded under its name, which the
    lineage check does not follow: another artifact of a kind already in the lineage (the initial model beside a
    round's, the original pairs beside a round's judged pairs)."""
    manifests = check_inputs(inputs)
    records = {kind: input_record(path) for kind, path in inputs.items()}
    for name, (kind, path) in (aside or {}).items():
        manifests[name] = check_inputs({kind: path})[kind]
        records[name] = input_record(path)
    with staged_dir(out) as tmp:
        output = StageOutput(Path(tmp), manifests)
        yield output
        barrier()  # every rank's files are written: rank 0 digests them
        if is_main():
            output.manifest = write_manifest(
                tmp, stage, inputs={**records, **output.inputs}, params=params, rows=output.rows, extra=output.extra
            )
    output.manifest = broadcast(output.manifest)
