"""The machine's faults end in one sentence (`pipeline.core.faults`): a disk that fills during `train`, a disk too small
for the model and a checkpoint (refused before the first step), a read-only folder, a forbidden one, an exceeded
quota. Each: exit status 1, no traceback, the path and the fix named, the previous artifact as it was and no staging
folder left. A real small tmpfs where this machine lets the test mount one (root), else the error injected at the
write."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import prepare_stages, tiny_params
from stages.cli import main

TRAIN = {"save_strategy": "steps", "save_steps": 1, "max_steps": 4, "logging_steps": 1}


def files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the size asked (bytes) under tmp_path; None where mounting is not allowed."""
    mounted = []

    def mount(size: int) -> Path | None:
        target = tmp_path / f"disk{len(mounted)}"
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)], capture_output=True)
        if done.returncode != 0:
            return None
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def fill(folder: Path, leave: int = 0) -> None:
    """Write a file into `folder` until its file system has about `leave` bytes free (or none)."""
    import shutil

    with open(folder / "filler", "wb") as f:
        try:
            while (room := shutil.disk_usage(folder).free - leave) > 0:
                f.write(b"\0" * min(room, 1 << 16))
                f.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    params = tiny_params(**TRAIN)
    prepare_stages(params, root, through="ref-logps")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def train(prepared: Path, out: Path, checkpoints: Path, live: Path):
    return CliRunner().invoke(
        main,
        [
            "train",
            "--params",
            str(prepared / "params.yaml"),
            "--tokenized",
            str(prepared / "tokenized"),
            "--base",
            str(prepared / "base"),
            "--ref-logps",
            str(prepared / "ref_logps"),
            "--out",
            str(out),
            "--checkpoints",
            str(checkpoints),
            "--live",
            str(live),
        ],
    )


def one_sentence(result, *expected: str) -> str:
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    for text in expected:
        assert text in result.output, result.output
    return result.output


def test_a_disk_that_fills_during_train_is_one_sentence_and_keeps_the_previous_model(
    prepared, tmp_path, small_disk, monkeypatch
):
    import stages.train as train_stage
    from pipeline.core import faults

    disk = small_disk(4 << 20)
    injected = disk is None
    if injected:  # no tmpfs here: the short write torch's zip writer reports on a full disk, on a disk with 1 MiB left
        disk = tmp_path / "disk"
        disk.mkdir()
    out, checkpoints = disk / "train", disk / "ck"
    assert train(prepared, out, checkpoints, tmp_path / "live").exit_code == 0  # the previous artifact
    before = files(out)

    class FillsTheDisk(train_stage.LiveMetricsCallback):  # another process fills the disk after step 2
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                if injected:
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3008 vs 2900")
                fill(disk)
            return super().on_step_end(args, state, control, **kwargs)

    monkeypatch.setattr(train_stage, "LiveMetricsCallback", FillsTheDisk)
    if injected:
        monkeypatch.setattr(faults, "free_space", lambda path: (1 << 20, 4 << 20))
    message = one_sentence(
        train(prepared, out, checkpoints, tmp_path / "live2"),
        "train: ",
        "no space left on the device",
        "Fix: free space there",
        "Nothing was published",
    )
    assert str(disk) in message
    assert files(out) == before  # the previous model, byte for byte
    assert not list(disk.glob("train.tmp-*")) and not list(disk.glob("train.old-*"))
    (run_dir,) = (p for p in checkpoints.iterdir() if p.is_dir())
    assert "checkpoint-1" in {p.name for p in run_dir.iterdir()}  # the last complete checkpoint stays, for resume


def test_a_disk_too_small_for_the_model_and_a_checkpoint_is_refused_before_the_first_step(
    prepared, tmp_path, small_disk, monkeypatch
):
    from pipeline.core import faults

    disk = small_disk(4 << 20)
    real = disk is not None
    if not real:
        disk = tmp_path / "disk"
        disk.mkdir()
    out, checkpoints = disk / "train", disk / "ck"
    assert train(prepared, out, checkpoints, tmp_path / "live").exit_code == 0
    before = files(out)
    if real:  # 20 KiB left: less than the model (54 KiB) and a checkpoint take
        fill(disk, leave=20 << 10)
    else:
        monkeypatch.setattr(faults, "free_space", lambda path: (20 << 10, 4 << 20))
    message = one_sentence(
        train(prepared, out, checkpoints, tmp_path / "live2"),
        "the trained model and one training checkpoint needs about",
        "is free on that file system",
        "Fix: free space there",
        "Nothing was written",
    )
    assert str(out) in message
    assert "step" not in message.split("needs about")[0]
    assert files(out) == before


@pytest.mark.parametrize(
    "code, what, fix",
    [
        (errno.EROFS, "the file system is read-only", "remount it read-write"),
        (errno.EACCES, "permission denied", "make it readable and writable by this user"),
        (errno.EDQUOT, "the disk quota is exceeded", "free space within your quota"),
        (errno.ENOSPC, "no space left on the device", "free space there"),
    ],
)
def test_a_refused_rename_into_place_is_one_sentence_and_restores_the_previous_artifact(
    tmp_path, monkeypatch, code, what, fix
):
    """The last write of every stage, the rename of its staged folder into place, refused by the machine."""
    import pipeline.store.artifacts as artifacts

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    out = tmp_path / "normalized"
    runner = CliRunner()
    assert runner.invoke(main, ["normalize", "--params", str(params), "--out", str(out)]).exit_code == 0
    before = files(out)
    real = os.replace

    def refused(src, dst):
        if (
            Path(dst) == out and ".tmp-" in Path(src).name
        ):  # the staged folder's rename (the previous one's restore works)
            raise OSError(code, os.strerror(code), str(dst))
        return real(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", refused)
    message = one_sentence(
        runner.invoke(main, ["normalize", "--params", str(params), "--out", str(out)]),
        f"normalize: {out}: {what}",
        f"Fix: {fix}",
        "the previous output is as it was",
    )
    assert message.count("\n") <= 1
    assert files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["normalized", "params.yaml"]  # no .tmp-/.old- folder


def test_a_read_only_artifacts_folder_is_one_sentence(tmp_path, small_disk):
    """A real read-only mount (where the test may mount): the staging folder cannot even be made."""
    disk = small_disk(1 << 20)
    if disk is None:
        pytest.skip("mounting a tmpfs is not allowed here (the injected rename above covers EROFS)")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    runner = CliRunner()
    assert runner.invoke(main, ["normalize", "--params", str(params), "--out", str(disk / "normalized")]).exit_code == 0
    before = files(disk / "normalized")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    message = one_sentence(
        runner.invoke(main, ["normalize", "--params", str(params), "--out", str(disk / "normalized")]),
        "the file system is read-only",
        "Fix: remount it read-write",
    )
    assert str(disk / "normalized") in message
    assert files(disk / "normalized") == before


def test_an_error_that_is_not_the_machines_keeps_its_traceback(tmp_path, monkeypatch):
    """Only the machine's faults become a sentence: a bug stays a bug, with its traceback."""
    from pipeline.core.faults import machine_fault

    assert machine_fault(KeyError("prompt_ids"), "train", [tmp_path]) is None
    assert machine_fault(RuntimeError("unexpected pos 3008 vs 2900"), "train", [tmp_path]) is None  # room left
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model.safetensors"))
    assert "no space left on the device" in machine_fault(wrapped, "export", [tmp_path])
