"""Whether a folder of model files can be loaded, checked as cheaply as loading reads them: no code in them runs.

Every pickled torch file is opened with `weights_only=True` (memory-mapped when it is torch.save's zip format, so its
tensor data is not read), every safetensors file's header is checked against the file's size, every JSON file is
parsed. Used for a checkpoint before resuming from it and for a local model directory before `base` records it.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Iterable


def files_problem(folder: Path, skip: Iterable[str] = ()) -> str | None:
    """Why a file under `folder` cannot be loaded (its name, the error's type and first line); None: all can."""
    import torch
    from safetensors import safe_open
    from transformers.trainer_pt_utils import safe_globals  # the numpy types the Trainer's own RNG-state load allows

    skip = set(skip)
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file() or path.name in skip:
            continue
        try:
            if path.suffix in (".pt", ".pth", ".bin"):
                # torch.save's zip format maps lazily; anything else (never written by torch.save) is unpickled
                with safe_globals():
                    torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
            elif path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    f.keys()
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception as err:  # noqa: BLE001 - any failure means: it does not load
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            return f"{path.relative_to(folder).as_posix()} cannot be loaded ({type(err).__name__}: {first[:200]})"
    return None
