"""Image paths stay inside the data: a row's image path (relative to the data file's directory, or absolute) is read
only when it resolves, symlinks followed, inside the data file's directory or `data.image_root`; anything else is the
row's `image_outside_source` under `data.on_invalid`, and its bytes never reach the artifact. Under DVC every image
file read must be covered by the normalize stage's deps, like the data file itself."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
from PIL import Image

import stages.normalize as normalize_stage
from pipeline.config.params import check_params
from pipeline.core.errors import PipelineError

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
YES, NO = [{"role": "assistant", "content": "red"}], [{"role": "assistant", "content": "blue"}]


def picture(path, colour=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path)
    return path


def rows(images: list[str]) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Colour {i}?"}]}],
            "chosen": YES,
            "rejected": NO,
            "images": [image],
        }
        for i, image in enumerate(images)
    ]


def write_jsonl(path, items):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


@pytest.fixture
def project(tmp_path, monkeypatch):
    """data/ with pictures; a secret picture outside it, and a link inside data/ that points at the secret."""
    monkeypatch.chdir(tmp_path)
    picture(tmp_path / "data" / "img" / "a.png")
    picture(tmp_path / "secret" / "s.png", (1, 2, 3))
    os.symlink(tmp_path / "secret" / "s.png", tmp_path / "data" / "img" / "link.png")
    return tmp_path


def normalize(out, **data):
    return normalize_stage.run(check_params({"data": {"eval_fraction": 0.2, **data}}), out)


def stored_bytes(out) -> list[bytes]:
    return [
        image["bytes"]
        for split in ("train", "eval")
        for row in pq.read_table(out / f"{split}.parquet").to_pylist()
        for image in row["images"] or []
    ]


@pytest.mark.parametrize("escape", ["../secret/s.png", "img/../../secret/s.png", "{root}/secret/s.png", "img/link.png"])
def test_a_path_outside_the_data_directory_is_refused_naming_row_and_rule(project, escape):
    escape = escape.format(root=project)
    write_jsonl(project / "data" / "pairs.jsonl", rows(["img/a.png"] * 4 + [escape]))
    with pytest.raises(PipelineError) as refused:
        normalize(project / "n", train="data/pairs.jsonl")
    message = str(refused.value)
    assert message.startswith("data/pairs.jsonl: row 4: ") and "[rule image_outside_source]" in message, message
    assert f"'{project / 'secret' / 's.png'}'" in message and "data.image_root" in message
    assert not (project / "n").exists()


def test_under_drop_the_outside_row_is_listed_and_its_bytes_never_stored(project):
    write_jsonl(project / "data" / "pairs.jsonl", rows(["img/a.png"] * 4 + ["../secret/s.png", "img/link.png"]))
    report = normalize(project / "n", train="data/pairs.jsonl", on_invalid="drop")
    assert report["dropped_by_reason"] == {"image_outside_source": 2}
    dropped = [json.loads(line) for line in (project / "n" / "dropped.jsonl").read_text().splitlines()]
    assert [(entry["row"], entry["rule"]) for entry in dropped] == [
        (4, "image_outside_source"),
        (5, "image_outside_source"),
    ]
    secret = (project / "secret" / "s.png").read_bytes()
    assert secret not in stored_bytes(project / "n")
    assert all(secret not in path.read_bytes() for path in (project / "n").iterdir())


def test_data_image_root_lets_paths_point_into_a_named_directory(project):
    write_jsonl(
        project / "data" / "pairs.jsonl", rows(["img/a.png"] * 3 + ["../secret/s.png", f"{project}/secret/s.png"])
    )
    report = normalize(project / "n", train="data/pairs.jsonl", image_root="secret")
    assert sum(report["rows_written"].values()) == 5
    assert stored_bytes(project / "n").count((project / "secret" / "s.png").read_bytes()) == 2
    with pytest.raises(PipelineError, match=r"data\.image_root=nowhere is not a directory"):
        normalize(project / "n2", train="data/pairs.jsonl", image_root="nowhere")


def test_a_link_that_stays_inside_the_data_directory_is_followed(project):
    os.symlink(project / "data" / "img" / "a.png", project / "data" / "img" / "alias.png")
    write_jsonl(project / "data" / "pairs.jsonl", rows(["img/alias.png"] * 5))
    assert sum(normalize(project / "n", train="data/pairs.jsonl")["rows_written"].values()) == 5


DVC_YAML = """stages:
  normalize:
    cmd: dpo normalize
    deps:
      - {deps}
    outs:
      - artifacts/normalized
"""


def test_under_dvc_every_image_file_read_is_covered_by_the_stage_deps(project, monkeypatch):
    write_jsonl(project / "data" / "pairs.jsonl", rows(["img/a.png"] * 5))
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.setenv("DVC_STAGE", "normalize")
    (project / "dvc.yaml").write_text(DVC_YAML.format(deps="data/pairs.jsonl"))  # the data file, not its images
    with pytest.raises(PipelineError) as refused:
        normalize(project / "n", train="data/pairs.jsonl")
    assert (
        "images[0]: the image file 'data/img/a.png' is not a dependency of the normalize stage in dvc.yaml"
        in str(refused.value)
    ) and "stages.normalize.deps" in str(refused.value)
    assert not (project / "n").exists()
    (project / "dvc.yaml").write_text(DVC_YAML.format(deps="data"))
    assert sum(normalize(project / "n", train="data/pairs.jsonl")["rows_written"].values()) == 5


def test_under_dvc_an_image_root_outside_the_stage_deps_is_refused(project, monkeypatch):
    write_jsonl(project / "data" / "pairs.jsonl", rows(["img/a.png"] * 5))
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.setenv("DVC_STAGE", "normalize")
    (project / "dvc.yaml").write_text(DVC_YAML.format(deps="data"))
    with pytest.raises(PipelineError, match=r"data\.image_root=secret is not a dependency of the normalize stage"):
        normalize(project / "n", train="data/pairs.jsonl", image_root="secret")


def test_the_python_api_reads_paths_as_given(tmp_path, monkeypatch):
    """In-process datasets (`DPOTrainer`) are the user's own objects: their paths are read from the working
    directory."""
    from pipeline.data.formats import canonical_pair

    picture(tmp_path / "elsewhere" / "p.png")
    monkeypatch.chdir(tmp_path / "elsewhere")
    [image] = canonical_pair({"prompt": PROMPT, "chosen": YES, "rejected": NO, "images": ["p.png"]})["images"]
    assert image["bytes"] == (tmp_path / "elsewhere" / "p.png").read_bytes()
