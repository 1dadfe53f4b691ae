"""Where raw preference rows come from: the built-in task, local files and directories, the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..builtin import BUILTIN_DATA, task
from ..errors import PipelineError

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _suffix(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    return suffixes[-1] if suffixes else ""


def load_dataset_source(source: str, *, split: str = "train", name: str | None = None, revision: str | None = None):
    """A `datasets.Dataset` for a local file, a `save_to_disk` directory or a Hub dataset id."""
    import datasets

    path = Path(source)
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()
                              or (path / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(path))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        if path.is_file():
            builder = LOCAL_BUILDERS.get(_suffix(path))
            if builder is None:
                raise PipelineError(f"{source}: unsupported file type; use .json, .jsonl, .parquet or .csv (optionally .gz).")
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if path.suffix or source.startswith((".", "/")):
            raise PipelineError(f"{source}: no such file or directory.")
        return datasets.load_dataset(source, name, split=split, revision=revision)
    except PipelineError:
        raise
    except Exception as err:  # datasets raises many types; the user needs the source and the cause
        raise PipelineError(f"{source}: could not load the dataset ({type(err).__name__}: {err}). "
                            "For a Hub id check the name, split and network (HF_HUB_OFFLINE); "
                            "for a local file check its format.") from None


def iter_rows(source: str, split: str = "train", **kwargs) -> Iterator[dict]:
    dataset = load_dataset_source(source, split=split, **kwargs)
    yield from dataset


def builtin_rows(params: dict, split: str) -> list[dict]:
    """The built-in task's pairs; train and eval use disjoint prompts."""
    train_prompts, eval_prompts = task.split_prompts(params["seed"], params["data"]["eval_fraction"])
    cfg = params["data"]["builtin"]
    if split == "train":
        return task.preference_pairs(train_prompts, cfg["num_pairs"], seed=params["seed"] + 1)
    return task.preference_pairs(eval_prompts, cfg["num_eval_pairs"], seed=params["seed"] + 2)


def is_builtin(source: str | None) -> bool:
    return source == BUILTIN_DATA
