"""Side-by-side figures: the `pipeline` package as it was before the chunked output layer and the streaming
reference pass (commit 65b108f: padded full-vocabulary logits, a whole split held as Python lists), taken
read-only out of git, and fresh worker processes that import one package or the other."""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE_REV = "65b108f"  # the last commit with the full-logits head and the list-holding reference pass


def baseline_root(rev: str, into: Path) -> Path:
    """A directory holding `pipeline/` as of `rev` (`git archive`: the checkout and its index are not touched)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "pipeline"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def use_package(root: str) -> None:
    """Import `pipeline` from `root` in this (worker) process."""
    sys.path.insert(0, root)
    import pipeline

    assert Path(pipeline.__file__).resolve().is_relative_to(Path(root).resolve()), pipeline.__file__


def run_worker(script: str, opts: dict) -> dict:
    """`script --worker` in a fresh interpreter, so its peak RSS is its own; the result is its last stdout line."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "DISABLE_TQDM": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(opts)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise SystemExit(f"worker {opts} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
