"""Digests of files and of local sources: what an artifact records to tell, later, whether its inputs changed."""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path

from pipeline.core.errors import PipelineError


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_glob(source: str) -> bool:
    return any(ch in source for ch in "*?[") and not Path(source).exists()


def glob_files(pattern: str) -> list[Path]:
    """The files a glob source reads, in name order."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise PipelineError(f"{pattern}: no file matches this pattern.")
    return [Path(file) for file in files]


MISSING_FIX = (
    "check the path in params.yaml (a relative path starts where the command runs: the project root), "
    "or restore the file (`dvc pull` / `git checkout` when it is tracked)"
)


def visible_files(directory: Path) -> list[Path]:
    """Every file under `directory` but hidden ones (`.git`, `.cache`), which `datasets` does not read either."""
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def glob_root(pattern: str) -> Path:
    """The directory part of a glob before its first wildcard: matched files are named relative to it."""
    fixed = []
    for part in Path(pattern).parts[:-1]:
        if any(ch in part for ch in "*?["):
            break
        fixed.append(part)
    return Path(*fixed)


def source_digest(source: str, key: str | None = None) -> str:
    """sha256 of a local source: of the file itself; of a directory or a glob, one digest over the sorted
    relative paths and digests of every file it reads, so adding, removing, renaming or editing one changes it."""
    path = Path(source)
    if path.is_file():
        return file_digest(path)
    if is_glob(source):
        root, files = glob_root(source), glob_files(source)
    elif path.is_dir():
        root, files = path, visible_files(path)
    else:
        raise PipelineError(f"{f'{key}=' if key else ''}{source}: no such file or directory; {MISSING_FIX}.")
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(root).as_posix()}\0{file_digest(file)}\n".encode())
    return digest.hexdigest()
