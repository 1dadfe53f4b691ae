"""Every input a stage reads is recorded precisely: Hub ids with the commit their revision resolved to (and
later loads use that commit), local data with its digest, the preprocess hook file, the built-in task; and under
`dvc repro` a local source outside the normalize stage's deps is refused.

Nothing here reaches the network: a fake local Hub cache (`<cache>/models--org--tiny/{refs,snapshots}`) stands in.
"""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import RepositoryNotFoundError

import pipeline.store.hub as hub
import stages.base as base_stage
import stages.normalize as normalize_stage
from conftest import tiny_params
from pipeline.config.params import check_params
from pipeline.core.errors import PipelineError
from pipeline.model.loading import load_base_model, load_base_tokenizer
from pipeline.store.base_record import adapter_source, base_source, describe_reference_and_adapter, reference_source
from pipeline.store.digests import file_digest, source_digest
from pipeline.store.hub import resolve_commit

SHA = "1" * 40
MOVED = "2" * 40
PAIRS = [{"prompt": f"Question {i}:", "chosen": f" good {i}.", "rejected": f" bad {i}."} for i in range(8)]
EVAL_PAIRS = [{"prompt": f"Held-out {i}:", "chosen": f" good {i}.", "rejected": f" bad {i}."} for i in range(4)]
UNRESOLVED = r"the commit is unresolved"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty local Hub cache, offline: huggingface_hub and transformers read these constants at call time."""
    cache = tmp_path / "hf-hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def set_ref(cache, folder: str, ref: str, sha: str) -> None:
    path = cache / folder / "refs" / ref
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(sha)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def manifest(directory) -> dict:
    return json.loads((directory / "manifest.json").read_text())


# ---- resolve_commit ---------------------------------------------------------------------------------


def test_resolve_commit_offline_reads_the_local_hub_cache(hub_cache):
    set_ref(hub_cache, "models--org--tiny", "main", SHA)
    set_ref(hub_cache, "datasets--org--prefs", "v1.0", MOVED)
    assert resolve_commit("org/tiny", None) == SHA
    assert resolve_commit("org/tiny", "main") == SHA
    assert resolve_commit("org/prefs", "v1.0", "dataset") == MOVED
    with pytest.warns(UserWarning, match=UNRESOLVED):
        assert resolve_commit("org/prefs", "v1.0") is None  # the model of that name is not cached
    with pytest.warns(UserWarning, match=r"model.name_or_path=org/unknown: .* " + UNRESOLVED):
        assert resolve_commit("org/unknown", None, key="model.name_or_path") is None  # not an error
    assert resolve_commit("org/unknown", "abcdef0123" * 4) == "abcdef0123" * 4  # a commit is returned as is


class FakeApi:
    """A stand-in for `huggingface_hub.HfApi` whose `repo_info` answers, or raises, as told."""

    def __init__(self, outcome):
        self.outcome = outcome

    def __call__(self):
        return self

    def repo_info(self, repo_id, revision=None, repo_type=None):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return type("Info", (), {"sha": self.outcome})()


def test_resolve_commit_online_asks_the_hub_and_falls_back_to_the_cache(hub_cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    set_ref(hub_cache, "models--org--tiny", "main", SHA)
    monkeypatch.setattr(hub, "HfApi", FakeApi(MOVED))
    assert resolve_commit("org/tiny", None) == MOVED  # the Hub knows better than the cache
    monkeypatch.setattr(hub, "HfApi", FakeApi(ConnectionError("no network")))
    assert resolve_commit("org/tiny", None) == SHA
    with pytest.warns(UserWarning, match=UNRESOLVED):
        assert resolve_commit("org/other", None) is None
    monkeypatch.setattr(hub, "HfApi", FakeApi(RepositoryNotFoundError.__new__(RepositoryNotFoundError)))
    with pytest.raises(PipelineError, match=r"model.ref_name_or_path=org/typo: no such model repository"):
        resolve_commit("org/typo", None, key="model.ref_name_or_path")


# ---- the base stage: a Hub model pinned to its commit -------------------------------------------------


def hub_params(**model) -> dict:
    params = tiny_params()
    params["model"].update(model)
    return params


def cache_model(cache, sha: str, model, tokenizer) -> None:
    snapshot = cache / "models--org--tiny" / "snapshots" / sha
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)


def test_the_base_stage_records_the_commit_and_every_later_load_uses_it(
    hub_cache, tmp_path, tiny_model, tiny_tokenizer
):
    from pipeline.builtin.model import build_model

    cache_model(hub_cache, SHA, tiny_model, tiny_tokenizer)
    set_ref(hub_cache, "models--org--tiny", "main", SHA)
    params = hub_params(name_or_path="org/tiny")
    base_dir = tmp_path / "base"
    recorded = base_stage.run(params, base_dir)
    assert (recorded["source"], recorded["revision"], recorded["commit"]) == ("org/tiny", None, SHA)
    assert base_source(base_dir) == ("org/tiny", SHA)

    # the branch moves on: a new snapshot with other weights becomes main
    moved = build_model(tiny_tokenizer, seed=1, hidden_size=32, num_layers=1, num_heads=2)
    cache_model(hub_cache, MOVED, moved, tiny_tokenizer)
    set_ref(hub_cache, "models--org--tiny", "main", MOVED)

    def same_weights(model, other) -> bool:
        expected = other.state_dict()
        return all(torch.equal(value, expected[name]) for name, value in model.state_dict().items())

    assert not same_weights(moved, tiny_model)
    loaded = load_base_model(base_dir, params)  # offline, from the cache, at the recorded commit
    assert same_weights(loaded, tiny_model)
    assert load_base_tokenizer(base_dir, params).get_vocab() == tiny_tokenizer.get_vocab()
    assert base_stage.run(params, tmp_path / "base-again")["commit"] == MOVED  # a new base run sees the move


def test_reference_and_adapter_record_revision_and_commit(hub_cache):
    set_ref(hub_cache, "models--org--ref", "v1", SHA)
    params = hub_params(ref_name_or_path="org/ref", ref_revision="v1", adapter="org/adapter")
    with pytest.warns(UserWarning, match=r"model.adapter=org/adapter: .* " + UNRESOLVED):
        info = describe_reference_and_adapter(params)
    assert info == {
        "reference": {"source": "org/ref", "revision": "v1", "commit": SHA},
        "adapter": {"source": "org/adapter", "revision": None, "commit": None},
    }


def test_reference_and_adapter_sources_load_the_recorded_commit(hub_cache, tmp_path, tiny_model, tiny_tokenizer):
    cache_model(hub_cache, SHA, tiny_model, tiny_tokenizer)
    set_ref(hub_cache, "models--org--tiny", "main", SHA)
    set_ref(hub_cache, "models--org--tiny", "v1", MOVED)
    set_ref(hub_cache, "models--org--adapter", "main", SHA)
    params = hub_params(name_or_path="org/tiny", ref_name_or_path="org/tiny", ref_revision="v1", adapter="org/adapter")
    base_stage.run(params, tmp_path / "base")
    assert reference_source(tmp_path / "base") == ("org/tiny", MOVED)
    assert adapter_source(tmp_path / "base") == ("org/adapter", SHA)


def test_a_name_that_is_neither_a_directory_nor_a_hub_id_is_refused(hub_cache, tmp_path):
    with pytest.raises(PipelineError, match=r"model.name_or_path=.*no such local directory, and not a Hub id"):
        base_stage.run(hub_params(name_or_path=str(tmp_path / "missing")), tmp_path / "base")


# ---- normalize: data source records ------------------------------------------------------------------


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The working directory of a run, so sources are given as relative paths, as in params.yaml."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    return tmp_path


def normalize(out, **data) -> dict:
    normalize_stage.run(check_params({"data": {"eval_fraction": 0.25, **data}}), out)
    return manifest(out)["sources"]


def test_a_local_file_is_recorded_as_given_with_its_digest(project):
    source = write_jsonl(project / "data" / "train.jsonl", PAIRS)
    recorded = normalize(project / "n1", train="data/train.jsonl")
    assert recorded == {
        "train": {"kind": "local", "path": "data/train.jsonl", "sha256": file_digest(source)},
        "eval": None,
        "preprocess": None,
    }
    assert json.loads((project / "n1" / "report.json").read_text())["sources"] == recorded
    write_jsonl(source, PAIRS[:-1])  # one line deleted
    assert normalize(project / "n2", train="data/train.jsonl")["train"]["sha256"] != recorded["train"]["sha256"]
    write_jsonl(source, PAIRS)  # the same bytes again: the same record
    assert normalize(project / "n3", train="data/train.jsonl") == recorded


def test_a_directory_a_glob_and_a_hook_file_are_recorded(project):
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(project / "data" / "saved"))
    write_jsonl(project / "data" / "parts" / "part-0.jsonl", EVAL_PAIRS[:2])
    write_jsonl(project / "data" / "parts" / "part-1.jsonl", EVAL_PAIRS[2:])
    (project / "hooks.py").write_text("def keep(row):\n    return {}\n")
    recorded = normalize(project / "n", train="data/saved", eval="data/parts/part-*.jsonl", preprocess="hooks.py:keep")
    assert recorded["train"] == {"kind": "local", "path": "data/saved", "sha256": source_digest("data/saved")}
    assert recorded["eval"] == {
        "kind": "local",
        "path": "data/parts/part-*.jsonl",
        "sha256": source_digest("data/parts/part-*.jsonl"),
    }
    assert recorded["preprocess"] == {"kind": "local", "path": "hooks.py", "sha256": file_digest(project / "hooks.py")}
    assert manifest(project / "n")["inputs"]["preprocess"] == recorded["preprocess"]["sha256"]


def test_source_digest_covers_every_file_of_a_directory_or_glob(project):
    write_jsonl(project / "d" / "a.jsonl", PAIRS[:4])
    write_jsonl(project / "d" / "sub" / "b.jsonl", PAIRS[4:])
    (project / "d" / ".cache").mkdir()
    before = source_digest("d")
    (project / "d" / ".cache" / "lock").write_text("x")  # hidden files are not read, so not digested
    assert source_digest("d") == before
    (project / "d" / "sub" / "b.jsonl").rename(project / "d" / "sub" / "c.jsonl")  # same bytes, another name
    assert source_digest("d") != before
    glob_digest = source_digest("d/*.jsonl")
    write_jsonl(project / "d" / "z.jsonl", PAIRS[:1])  # a new file the glob matches
    assert source_digest("d/*.jsonl") != glob_digest
    assert source_digest("d/a.jsonl") == file_digest(project / "d" / "a.jsonl")
    with pytest.raises(PipelineError, match="no such file or directory"):
        source_digest("d/missing.jsonl")


def test_the_builtin_task_is_recorded_as_builtin(tmp_path):
    normalize_stage.run(tiny_params(), tmp_path / "n")
    assert manifest(tmp_path / "n")["sources"] == {
        "train": {"kind": "builtin", "name": "builtin:sentiment"},
        "eval": None,
        "preprocess": None,
    }


def test_a_hub_dataset_is_recorded_with_its_commit_and_read_at_it(project, hub_cache, monkeypatch):
    set_ref(hub_cache, "datasets--org--prefs", "v1.0", SHA)
    calls = []

    def load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        return datasets.Dataset.from_list(PAIRS if split == "train" else EVAL_PAIRS)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    recorded = normalize(
        project / "n", train="org/prefs", name="pairs", revision="v1.0", eval="org/prefs", eval_split="test"
    )
    assert recorded["train"] == {
        "kind": "hub",
        "repo_id": "org/prefs",
        "name": "pairs",
        "split": "train",
        "revision": "v1.0",
        "commit": SHA,
    }
    assert recorded["eval"] == {**recorded["train"], "split": "test"}
    assert calls == [("org/prefs", "pairs", "train", SHA), ("org/prefs", "pairs", "test", SHA)]
    with pytest.warns(UserWarning, match="data.train=org/uncached: .* the commit is unresolved"):
        unresolved = normalize(project / "n2", train="org/uncached")["train"]  # offline, not cached
    assert unresolved["commit"] is None and calls[-1] == ("org/uncached", None, "train", None)


# ---- the DVC guard -------------------------------------------------------------------------------------

DVC_YAML = """stages:
  normalize:
    cmd: dpo normalize
    deps:
      - pipeline/data/normalize.py
      - data
      - hooks/inside.py
    params:
      - data
    outs:
      - artifacts/normalized
"""


@pytest.fixture
def dvc_project(project, monkeypatch):
    (project / "dvc.yaml").write_text(DVC_YAML)
    write_jsonl(project / "data" / "train.jsonl", PAIRS)
    write_jsonl(project / "elsewhere" / "train.jsonl", PAIRS)
    for name in ("inside", "outside"):
        (project / "hooks").mkdir(exist_ok=True)
        (project / "hooks" / f"{name}.py").write_text("def keep(row):\n    return {}\n")
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.setenv("DVC_STAGE", "normalize")
    return project


def test_under_dvc_sources_inside_the_stage_deps_pass(dvc_project):
    write_jsonl(dvc_project / "data" / "eval.jsonl", EVAL_PAIRS)
    recorded = normalize(
        dvc_project / "n",
        train="data/train.jsonl",
        eval=str(dvc_project / "data" / "eval.jsonl"),
        preprocess="hooks/inside.py:keep",
    )
    assert recorded["train"]["path"] == "data/train.jsonl" and recorded["preprocess"]["path"] == "hooks/inside.py"


@pytest.mark.parametrize(
    "key, data, given",
    [
        ("data.train", {"train": "elsewhere/train.jsonl"}, "elsewhere/train.jsonl"),
        ("data.train", {"train": "elsewhere/*.jsonl"}, "elsewhere/*.jsonl"),
        ("data.eval", {"train": "data/train.jsonl", "eval": "elsewhere/train.jsonl"}, "elsewhere/train.jsonl"),
        ("data.preprocess", {"train": "data/train.jsonl", "preprocess": "hooks/outside.py:keep"}, "hooks/outside.py"),
    ],
)
def test_under_dvc_a_source_outside_the_stage_deps_is_refused(dvc_project, key, data, given):
    message = (
        f"{key}={given} is not a dependency of the normalize stage in dvc.yaml, so DVC would not re-run "
        "normalize when it changes; move it under data/ or add it to stages.normalize.deps in dvc.yaml"
    )
    with pytest.raises(PipelineError) as refused:
        normalize(dvc_project / "n", **data)
    assert str(refused.value).startswith(message)
    assert not (dvc_project / "n").exists()


def test_outside_dvc_nothing_is_checked(dvc_project, monkeypatch):
    monkeypatch.delenv("DVC_STAGE")
    assert normalize(dvc_project / "n", train="elsewhere/train.jsonl")["train"]["path"] == "elsewhere/train.jsonl"


def test_under_dvc_a_local_model_outside_the_base_stage_deps_is_refused(
    project, monkeypatch, tiny_model, tiny_tokenizer
):
    from pipeline.store.base_record import describe_source

    for where in ("models/tiny", "elsewhere/tiny"):
        tiny_model.save_pretrained(project / where)
    (project / "dvc.yaml").write_text(
        "stages:\n  base:\n    cmd: dpo base\n    deps:\n      - models\n    outs:\n      - artifacts/base\n"
    )
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.setenv("DVC_STAGE", "base")
    monkeypatch.chdir(project)
    assert describe_source("models/tiny", None, "model.name_or_path")["source_files"]
    with pytest.raises(
        PipelineError,
        match=r"model\.name_or_path=elsewhere/tiny is not a dependency of the base stage "
        r"in dvc\.yaml.*add it to stages\.base\.deps",
    ):
        describe_source("elsewhere/tiny", None, "model.name_or_path")
