"""The machine's faults in one sentence: a full disk, an exceeded quota, a read-only or forbidden folder.

`machine_fault(err, stage, folders)` says what such an error means, where, with the free space and the fix (None for
any other error); the stage commands (`stages.common.user_errors`) turn it into their one-line error. A stage's output
is staged and renamed into place only when complete (`pipeline.store.artifacts.staged_dir`), so after such a fault
nothing
is published and the previous artifact is as it was. `require_free_space` refuses up front a write whose size is
known (a model, a checkpoint).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Iterable

from pipeline.core.errors import PipelineError

FULL, QUOTA, READ_ONLY, DENIED, NOT_DIR = "full", "quota", "read-only", "denied", "not a folder"
ERRNO_KIND = {
    errno.ENOSPC: FULL,
    errno.EDQUOT: QUOTA,
    errno.EFBIG: FULL,
    errno.EROFS: READ_ONLY,
    errno.EACCES: DENIED,
    errno.EPERM: DENIED,
    errno.ENOTDIR: NOT_DIR,
}
# how writers that raise no OSError say it: torch's zip writer, safetensors (Rust), pyarrow
SIGNS = {
    "No space left on device": FULL,
    "StorageFull": FULL,
    "Disk quota exceeded": QUOTA,
    "QuotaExceeded": QUOTA,
    "Read-only file system": READ_ONLY,
    "ReadOnlyFilesystem": READ_ONLY,
    "Permission denied": DENIED,
    "PermissionDenied": DENIED,
}
# torch's zip writer after a short write: the cause is not named, the free space tells
SHORT_WRITE = ("unexpected pos", "file write failed")
LOW_SPACE = 64 << 20  # bytes: below this, a short write is taken for a full disk

WHAT = {
    FULL: "no space left on the device",
    QUOTA: "the disk quota is exceeded",
    READ_ONLY: "the file system is read-only",
    DENIED: "permission denied",
    NOT_DIR: "a file is where a folder must be",
}
FIX = {
    FULL: "free space there (old runs' checkpoints under artifacts/checkpoints/ and `dvc gc` for DVC's unused "
    "cache are the usual culprits), or write elsewhere (the stage's --out/--checkpoints options, a bigger disk)",
    QUOTA: "free space within your quota there, ask for a larger one, or write elsewhere (the stage's "
    "--out/--checkpoints options)",
    READ_ONLY: "remount it read-write, or write elsewhere (the stage's --out/--checkpoints options)",
    DENIED: "make it readable and writable by this user (`ls -ld` it; chown or chmod), or use another folder",
    NOT_DIR: "move the file away, or pass another path (the stage's --out/--checkpoints/--live options)",
}


def size_text(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def existing_parent(path: Path) -> Path:
    """`path` or its nearest existing ancestor (where a folder not made yet would be)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_space(path: Path) -> tuple[int, int] | None:
    """(free, total) bytes of the file system `path` is (or would be) on; None when unknown."""
    try:
        usage = shutil.disk_usage(existing_parent(path))
    except OSError:
        return None
    return usage.free, usage.total


def _kind(err: BaseException) -> str | None:
    if isinstance(err, OSError) and err.errno in ERRNO_KIND:
        return ERRNO_KIND[err.errno]
    text = str(err)
    return next((kind for sign, kind in SIGNS.items() if sign in text), None)


def _chain(err: BaseException) -> Iterable[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def machine_fault(err: BaseException, stage: str, folders: Iterable[Path]) -> str | None:
    """The sentence for a full disk, an exceeded quota, a read-only or forbidden path in `err` (or in what caused it),
    raised while `stage` wrote `folders` (its output folders); None for any other error."""
    folders = [Path(f) for f in folders]
    for cause in _chain(err):
        kind = _kind(cause)
        path = getattr(cause, "filename", None) if isinstance(cause, OSError) else None
        if kind is None and any(sign in str(cause) for sign in SHORT_WRITE):
            # a short write without a reason: a full disk if one of the folders is (nearly) out of space
            low = [f for f in folders if (space := free_space(f)) and space[0] < LOW_SPACE]
            if not low:
                continue
            kind, path = FULL, low[0]
        if kind is None:
            continue
        if kind == NOT_DIR and not path:  # the folder given that is (or sits under) a file
            path = next((f for f in folders if existing_parent(f).is_file()), None)
        where = Path(path) if path else (folders[0] if folders else Path.cwd())
        space = free_space(where) if kind in (FULL, QUOTA) else None
        room = f" ({size_text(space[0])} free of {size_text(space[1])})" if space else ""
        return (
            f"{stage}: {where}: {WHAT[kind]}{room}. Fix: {FIX[kind]}. Nothing was published; the previous "
            f"output is as it was."
        )
    return None


def require_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse up front when the file system of `folder` has less than `needed` bytes (plus 5%) free for `what`."""
    space = free_space(folder)
    if space is None:
        return
    free, total = space
    want = int(needed * 1.05)
    if free < want:
        raise PipelineError(
            f"{folder}: {what} needs about {size_text(want)} but only {size_text(free)} of "
            f"{size_text(total)} is free on that file system. Fix: {FIX[FULL]}. Nothing was written."
        )


def same_file_system(a: Path, b: Path) -> bool:
    try:
        return os.stat(existing_parent(a)).st_dev == os.stat(existing_parent(b)).st_dev
    except OSError:
        return False
