"""A corpus of machine- and file-level faults, each met through the `dpo` command as a user meets it: none ends in a
traceback, each names the file or folder and the fix, and no published artifact is lost or changed.

The project: the built-in model saved as a local model directory, a local JSONL data file, and the artifacts of
base → normalize → tokenize → ref-logps made from them. Each case copies it, breaks one thing, runs one stage.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
import yaml
from click.testing import CliRunner

from conftest import tiny_params
from stages.cli import main

ARTIFACTS = ("base", "normalized", "tokenized", "ref_logps")


def snapshot(project: Path) -> dict[str, bytes]:
    """Every published artifact's files (the staging leftovers would show as new names)."""
    found = {}
    for path in sorted((project / "artifacts").rglob("*")):
        if path.is_file() and not path.is_symlink():
            found[path.relative_to(project).as_posix()] = path.read_bytes()
    return found


def run(project: Path, *args: str):
    cwd = os.getcwd()
    os.chdir(project)
    try:
        return CliRunner().invoke(main, list(args))
    finally:
        os.chdir(cwd)


def set_params(project: Path, **sections) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    from conftest import write_builtin_model
    from pipeline.data.sources import builtin_rows

    project = tmp_path_factory.mktemp("project")
    params = tiny_params()
    (project / "data").mkdir()
    for split, name in (("train", "pairs.jsonl"), ("eval", "eval.jsonl")):
        (project / "data" / name).write_text("".join(json.dumps(r) + "\n" for r in builtin_rows(params, split)))
    write_builtin_model(project / "model")
    params["model"]["name_or_path"] = "model"
    params["data"].update({"train": "data/pairs.jsonl", "eval": "data/eval.jsonl"})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("base", "normalize", "tokenize", "ref-logps"):
        result = run(project, stage)
        assert result.exit_code == 0, result.output
    return project


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def replace_with_dir(path: Path) -> None:
    path.unlink()
    path.mkdir()


# name → (break the project, the stage's arguments, what the message must hold (besides the exit status and no
# traceback))
CASES: dict[str, tuple[Callable[[Path], None], list[str], list[str]]] = {
    "data file removed after normalize": (
        lambda p: (p / "data" / "pairs.jsonl").unlink(),
        ["normalize"],
        ["data/pairs.jsonl", "data.train"],
    ),
    "data file replaced by a directory": (
        lambda p: replace_with_dir(p / "data" / "pairs.jsonl"),
        ["normalize"],
        ["data/pairs.jsonl"],
    ),
    "data file emptied": (lambda p: (p / "data" / "pairs.jsonl").write_text(""), ["normalize"], ["data/pairs.jsonl"]),
    "data file is a symlink to itself": (
        lambda p: ((p / "data" / "pairs.jsonl").unlink(), (p / "data" / "pairs.jsonl").symlink_to("pairs.jsonl")),
        ["normalize"],
        ["data/pairs.jsonl"],
    ),
    "data file changed after normalize": (
        lambda p: truncate(p / "data" / "pairs.jsonl", 0.9),
        ["tokenize"],
        ["data/pairs.jsonl", "dvc repro normalize"],
    ),
    "params file is a directory": (
        lambda p: ((p / "params.yaml").unlink(), (p / "params.yaml").mkdir()),
        ["tokenize"],
        ["params.yaml"],
    ),
    "params file missing": (lambda p: (p / "params.yaml").unlink(), ["tokenize"], ["params.yaml"]),
    "params file is not text": (
        lambda p: (p / "params.yaml").write_bytes(b"\xff\xfe\x00model: {}\x00"),
        ["tokenize"],
        ["params.yaml"],
    ),
    "params file is not YAML": (
        lambda p: (p / "params.yaml").write_text("model:\n\tname_or_path: x\n"),
        ["tokenize"],
        ["params.yaml", "YAML"],
    ),
    "params file is a list": (lambda p: (p / "params.yaml").write_text("- 1\n- 2\n"), ["tokenize"], ["params.yaml"]),
    "params file names a key twice": (
        lambda p: (p / "params.yaml").write_text((p / "params.yaml").read_text() + "seed: 3\n"),
        ["tokenize"],
        ["params.yaml", "seed", "twice"],
    ),
    "model folder with a truncated safetensors file": (
        lambda p: truncate(p / "model" / "model.safetensors"),
        ["base"],
        ["model.safetensors"],
    ),
    "tokenizer folder missing its vocabulary": (
        lambda p: (p / "model" / "tokenizer.json").unlink(),
        ["tokenize"],
        ["model", "tokenizer.json"],
    ),
    "model folder removed after base": (
        lambda p: shutil.rmtree(p / "model"),
        ["ref-logps"],
        ["model", "dvc repro base"],
    ),
    "a parquet file of an artifact truncated": (
        lambda p: truncate(next((p / "artifacts" / "tokenized").glob("*.parquet"))),
        ["ref-logps"],
        ["artifacts/tokenized", ".parquet", "dvc checkout"],
    ),
    "an artifact's manifest truncated": (
        lambda p: truncate(p / "artifacts" / "tokenized" / "manifest.json"),
        ["ref-logps"],
        ["artifacts/tokenized/manifest.json", "damaged", "dvc repro tokenize"],
    ),
    "an artifact's manifest from another stage": (
        lambda p: shutil.copy(
            p / "artifacts" / "normalized" / "manifest.json", p / "artifacts" / "tokenized" / "manifest.json"
        ),
        ["ref-logps"],
        ["artifacts/tokenized", "tokenize"],
    ),
    "an artifact's manifest of an older schema": (
        lambda p: (p / "artifacts" / "tokenized" / "manifest.json").write_text(
            (p / "artifacts" / "tokenized" / "manifest.json")
            .read_text()
            .replace('"schema_version": 2', '"schema_version": 1')
        ),
        ["ref-logps"],
        ["artifacts/tokenized/manifest.json", "schema version 1"],
    ),
    "an artifact's file removed": (
        lambda p: next((p / "artifacts" / "tokenized").glob("*.parquet")).unlink(),
        ["ref-logps"],
        ["artifacts/tokenized", "missing"],
    ),
    "an input artifact that is a file": (
        lambda p: (shutil.rmtree(p / "artifacts" / "tokenized"), (p / "artifacts" / "tokenized").write_text("x")),
        ["ref-logps"],
        ["artifacts/tokenized", "dpo tokenize"],
    ),
    "an output path that is a file": (lambda p: (p / "out").write_text("x"), ["tokenize", "--out", "out"], ["out"]),
    "a checkpoints path that is a file": (
        lambda p: (p / "ck").write_text("x"),
        ["train", "--checkpoints", "ck"],
        ["ck"],
    ),
    "a preprocess hook file that does not exist": (
        lambda p: set_params(p, data={"preprocess": "hooks.py:convert"}),
        ["normalize"],
        ["hooks.py"],
    ),
    "a preprocess hook that raises": (
        lambda p: (
            (p / "hooks.py").write_text("def convert(row):\n    raise KeyError('question')\n"),
            set_params(p, data={"preprocess": "hooks.py:convert"}),
        ),
        ["normalize"],
        ["data.preprocess", "rows 0, 1"],
    ),
    "the eval file is missing": (
        lambda p: set_params(p, data={"eval": "data/missing.jsonl"}),
        ["normalize"],
        ["data/missing.jsonl"],
    ),
}


def test_the_corpus_is_large():
    assert len(CASES) >= 20


@pytest.mark.parametrize("name", list(CASES))
def test_a_fault_is_one_sentence_and_loses_nothing(made, tmp_path, name):
    project = tmp_path / "project"
    shutil.copytree(made, project, symlinks=True)
    breaks, args, expected = CASES[name]
    breaks(project)
    before = snapshot(project)
    result = run(project, *args)
    assert result.exit_code in (1, 2) and isinstance(result.exception, SystemExit), (
        name,
        result.output,
        result.exception,
    )
    assert "Traceback" not in result.output, result.output
    for text in expected:
        assert text in result.output, (name, text, result.output)
    assert snapshot(project) == before, name  # nothing published changed, no staging folder left
