"""Many processes (pipeline.core.distributed): `dpo <stage>` launches the processes `distributed` asks for; 2 processes
(gloo, CPU) give one process's artifacts with the same global batch; each rank of ref-logps scores half of the
rows; two "machines" on the loopback address train to the same weights; a rank that dies fails the launch and
publishes nothing."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import prepare_stages, tiny_params
from pipeline.config.params import check_params
from pipeline.core.distributed import launch_command
from pipeline.core.errors import PipelineError
from pipeline.run.resume import last_run

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"max_steps": 4, "logging_steps": 1, "learning_rate": 3e-3}  # 4 full global batches of 8 pairs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_processes(params: dict, **distributed) -> dict:
    return check_params({**params, "distributed": {**params["distributed"], **distributed}})


def run_stage(tmp_path, params: dict, stage: str, *paths: str, env: dict | None = None, check: bool = True):
    """`python -m stages.cli <stage>` (as dvc.yaml runs it) with `params` written to a file."""
    params_file = tmp_path / f"params-{stage}-{len(list(tmp_path.glob('params-*')))}.yaml"
    params_file.write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, "-m", "stages.cli", stage, "--params", str(params_file), *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    prepare_stages(tiny_params(**TRAIN), root, through="ref-logps")
    return root


# ---- the launcher -------------------------------------------------------------------------------------


def test_one_process_needs_no_launcher_and_more_get_torchrun_or_accelerate(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    params = check_params({})
    assert launch_command(params, ["train"]) is None
    two = with_processes(params, num_processes=2, main_process_port=29511)
    command = launch_command(two, ["train", "--params", "p.yaml"])
    assert command[1:3] == ["-m", "torch.distributed.run"] and command[-5:] == [
        "-m",
        "stages.cli",
        "train",
        "--params",
        "p.yaml",
    ]
    assert (
        command[command.index("--nproc_per_node") + 1] == "2" and command[command.index("--master_port") + 1] == "29511"
    )
    config = tmp_path / "multi_gpu.yaml"
    config.write_text("distributed_type: MULTI_GPU\n")
    fsdp = with_processes(
        params,
        num_processes=2,
        num_machines=2,
        machine_rank=1,
        main_process_ip="10.0.0.1",
        config_file=str(config),
        mixed_precision="bf16",
    )
    command = launch_command(fsdp, ["train"])
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    for flag, value in (
        ("--num_processes", "4"),
        ("--num_machines", "2"),
        ("--machine_rank", "1"),
        ("--main_process_ip", "10.0.0.1"),
        ("--mixed_precision", "bf16"),
        ("--config_file", str(config)),
    ):
        assert command[command.index(flag) + 1] == value
    monkeypatch.setenv("WORLD_SIZE", "2")  # inside a launched process: never launch again
    assert launch_command(two, ["train"]) is None


def test_launch_settings_that_cannot_work_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(PipelineError, match=r"distributed.machine_rank is 2 but distributed.num_machines is 2"):
        check_params({"distributed": {"num_machines": 2, "machine_rank": 2}})
    with pytest.raises(PipelineError, match=r"distributed.config_file: nope.yaml does not exist"):
        launch_command(with_processes(check_params({}), num_processes=2, config_file="nope.yaml"), ["train"])
    if not torch.cuda.is_available():  # accelerate would fall back to plain data parallelism without a word
        for name, engine in (("deepspeed_zero2", "DeepSpeed"), ("deepspeed_zero3", "DeepSpeed"), ("fsdp", "FSDP")):
            with pytest.raises(PipelineError, match=rf"uses {engine}, which needs CUDA GPUs"):
                launch_command(
                    with_processes(
                        check_params({}), num_processes=2, config_file=str(ROOT / f"configs/accelerate/{name}.yaml")
                    ),
                    ["train"],
                )


def test_the_shipped_accelerate_configs_are_valid_yaml_for_their_engine():
    configs = {p.stem: yaml.safe_load(p.read_text()) for p in (ROOT / "configs" / "accelerate").glob("*.yaml")}
    assert {"ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"} <= set(configs)
    assert configs["ddp"]["distributed_type"] == "MULTI_GPU"
    assert configs["fsdp"]["distributed_type"] == "FSDP"
    assert configs["deepspeed_zero3"]["deepspeed_config"]["zero_stage"] == 3


# ---- 2 processes against 1 (gloo, CPU) ---------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_give_one_process_artifacts(tmp_path, prepared):
    one = tiny_params(**TRAIN)
    two = with_processes(
        tiny_params(**TRAIN, per_device_train_batch_size=4, per_device_eval_batch_size=8),
        num_processes=2,
        main_process_port=free_port(),
    )
    tok, base = ["--tokenized", str(prepared / "tokenized")], ["--base", str(prepared / "base")]
    outputs = {}
    for name, params in (("one", one), ("two", two)):
        out = tmp_path / name
        run_stage(tmp_path, params, "ref-logps", *tok, *base, "--out", str(out / "ref_logps"))
        run_stage(
            tmp_path,
            params,
            "train",
            *tok,
            *base,
            "--ref-logps",
            str(out / "ref_logps"),
            "--out",
            str(out / "train"),
            "--checkpoints",
            str(out / "ck"),
            "--live",
            str(out / "live"),
        )
        run_stage(
            tmp_path,
            params,
            "evaluate",
            *tok,
            *base,
            "--ref-logps",
            str(out / "ref_logps"),
            "--train",
            str(out / "train"),
            "--normalized",
            str(prepared / "normalized"),
            "--out",
            str(out / "eval"),
            "--metrics",
            str(out / "eval.json"),
            "--live",
            str(out / "live"),
            "--report",
            str(out / "report.html"),
        )
        outputs[name] = out

    # ref-logps: the same values; each of the two ranks scored half of the rows
    for split in ("train", "eval"):
        a, b = (pq.read_table(outputs[n] / "ref_logps" / f"{split}.parquet").to_pydict() for n in ("one", "two"))
        assert a["row_id"] == b["row_id"]
        torch.testing.assert_close(
            torch.tensor(a["ref_chosen_logps"]), torch.tensor(b["ref_chosen_logps"]), rtol=1e-5, atol=1e-5
        )
    manifest = json.loads((outputs["two"] / "ref_logps" / "manifest.json").read_text())
    for split, counts in manifest["rows_per_rank"].items():
        assert len(counts) == 2 and sum(counts) == manifest["rows"][split] and abs(counts[0] - counts[1]) <= 1, counts
    assert not list(outputs["two"].glob("*.tmp-*")) and not list(outputs["two"].glob("*/.*.parquet"))

    # train: the same weights and logged metrics; one manifest, with the weights
    from safetensors.torch import load_file

    w1, w2 = (load_file(outputs[n] / "train" / "model" / "model.safetensors") for n in ("one", "two"))
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-5, atol=1e-5, msg=key)
    h1, h2 = (json.loads((outputs[n] / "train" / "log_history.json").read_text()) for n in ("one", "two"))
    for e1, e2 in zip(h1, h2, strict=True):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "entropy", "num_tokens"):
            if key in e1:
                assert e2[key] == pytest.approx(e1[key], rel=1e-4, abs=1e-5), (key, e1, e2)

    # evaluate: the same metrics, the generations shared out across the ranks
    m1, m2 = (json.loads((outputs[n] / "eval.json").read_text()) for n in ("one", "two"))
    assert (m1.pop("environment")["processes"], m2.pop("environment")["processes"]) == (1, 2)  # where each ran
    flat = lambda d, p="": {
        f"{p}{k}": v
        for k0, v0 in d.items()
        for k, v in (flat(v0, f"{k0}/").items() if isinstance(v0, dict) else [(k0, v0)])
    }  # noqa: E731
    f1, f2 = flat(m1), flat(m2)
    assert f1.keys() == f2.keys()
    for key, value in f1.items():
        assert f2[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


@pytest.mark.slow
def test_two_machines_on_the_loopback_address_train_to_the_same_weights(tmp_path, prepared):
    port = free_port()
    outs = {}
    one = tiny_params(**TRAIN)
    paths = lambda out: [
        "--tokenized",
        str(prepared / "tokenized"),
        "--base",
        str(prepared / "base"),  # noqa: E731
        "--ref-logps",
        str(prepared / "ref_logps"),
        "--out",
        str(out / "train"),
        "--checkpoints",
        str(out / "ck"),
        "--live",
        str(out / "live"),
    ]
    run_stage(tmp_path, one, "train", *paths(tmp_path / "one"))
    machines = []
    for rank in (0, 1):
        params = with_processes(
            tiny_params(**TRAIN, per_device_train_batch_size=4),
            num_machines=2,
            machine_rank=rank,
            main_process_ip="127.0.0.1",
            main_process_port=port,
        )
        params_file = tmp_path / f"machine{rank}.yaml"
        params_file.write_text(yaml.safe_dump(params))
        outs[rank] = tmp_path / f"machine{rank}"
        machines.append(
            subprocess.Popen(
                [sys.executable, "-m", "stages.cli", "train", "--params", str(params_file), *paths(outs[rank])],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = [m.communicate(timeout=600)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], "\n".join(log[-3000:] for log in logs)
    from safetensors.torch import load_file

    want = load_file(tmp_path / "one" / "train" / "model" / "model.safetensors")
    got = load_file(outs[0] / "train" / "model" / "model.safetensors")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)
    assert not (outs[1] / "train").exists()  # only global rank 0 publishes


FAIL_ON_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import pipeline.run.reference_pass as reference
    def broken(*args, **kwargs):
        raise RuntimeError("rank 1 lost its device")
    reference.score_block = broken
"""


def test_a_rank_that_dies_fails_the_launch_and_publishes_nothing(tmp_path, prepared):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAIL_ON_RANK_1)  # runs in each launched interpreter
    import os

    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"}
    out = tmp_path / "ref_logps"
    params = with_processes(tiny_params(**TRAIN), num_processes=2, main_process_port=free_port())
    proc = run_stage(
        tmp_path,
        params,
        "ref-logps",
        "--tokenized",
        str(prepared / "tokenized"),
        "--base",
        str(prepared / "base"),
        "--out",
        str(out),
        env=env,
        check=False,
    )
    assert proc.returncode != 0
    assert "rank 1 lost its device" in proc.stdout + proc.stderr
    assert "a process of the launch failed" in proc.stderr
    assert not out.exists()
    # the next run (here: one process) removes the failed launch's staging leftovers and publishes
    run_stage(
        tmp_path,
        tiny_params(**TRAIN),
        "ref-logps",
        "--tokenized",
        str(prepared / "tokenized"),
        "--base",
        str(prepared / "base"),
        "--out",
        str(out),
    )
    assert (out / "manifest.json").exists() and not list(tmp_path.glob("ref_logps.*"))


@pytest.mark.slow
def test_a_new_lora_adapter_with_its_adapter_off_reference_trains_alike_on_two_processes(tmp_path, prepared):
    """PEFT under DDP: the online reference is the base with the adapter off, on every rank."""

    def lora(**train):
        params = tiny_params(**TRAIN, precompute_ref_log_probs=False, **train)
        params["model"]["peft"].update(enabled=True, r=4, lora_alpha=8, lora_dropout=0.0)
        return check_params(params)

    paths = lambda out: [
        "--tokenized",
        str(prepared / "tokenized"),
        "--base",
        str(prepared / "base"),  # noqa: E731
        "--ref-logps",
        str(prepared / "ref_logps"),
        "--out",
        str(out / "train"),
        "--checkpoints",
        str(out / "ck"),
        "--live",
        str(out / "live"),
    ]
    run_stage(tmp_path, lora(), "train", *paths(tmp_path / "one"))
    run_stage(
        tmp_path,
        with_processes(lora(per_device_train_batch_size=4), num_processes=2, main_process_port=free_port()),
        "train",
        *paths(tmp_path / "two"),
    )
    from safetensors.torch import load_file

    want, got = (load_file(tmp_path / n / "train" / "model" / "adapter_model.safetensors") for n in ("one", "two"))
    assert want.keys() == got.keys() and want
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)
    h1, h2 = (json.loads((tmp_path / n / "train" / "log_history.json").read_text()) for n in ("one", "two"))
    margins = [[e["rewards/margins"] for e in h if "rewards/margins" in e] for h in (h1, h2)]
    assert len(margins[0]) == 4 and margins[1] == pytest.approx(margins[0], rel=1e-4, abs=1e-6)


FAIL_AT_STEP_3_ON_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import pipeline.run.trainer as trainer
    step = trainer.DPOTrainer.training_step
    def failing(self, *args, **kwargs):
        if self.state.global_step == 3:
            raise RuntimeError("rank 1 died at step 4")
        return step(self, *args, **kwargs)
    trainer.DPOTrainer.training_step = failing
"""


@pytest.mark.slow
def test_a_launch_that_dies_in_training_resumes_from_its_last_checkpoint(tmp_path, prepared):
    import os

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAIL_AT_STEP_3_ON_RANK_1)
    out = tmp_path / "two"
    paths = lambda out: [
        "--tokenized",
        str(prepared / "tokenized"),
        "--base",
        str(prepared / "base"),  # noqa: E731
        "--ref-logps",
        str(prepared / "ref_logps"),
        "--out",
        str(out / "train"),
        "--checkpoints",
        str(out / "ck"),
        "--live",
        str(out / "live"),
    ]
    two = with_processes(
        tiny_params(**TRAIN, per_device_train_batch_size=4, save_strategy="steps", save_steps=2),
        num_processes=2,
        main_process_port=free_port(),
    )
    failed = run_stage(
        tmp_path, two, "train", *paths(out), check=False, env={**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"}
    )
    assert failed.returncode != 0 and "rank 1 died at step 4" in failed.stdout + failed.stderr
    assert not (out / "train").exists() and list((out / "ck").glob("*/checkpoint-2"))
    run_stage(tmp_path, two, "train", *paths(out))  # the same command again: resumes
    resumed = last_run(out / "ck")["resumed_from"]
    assert resumed.endswith("checkpoint-2"), resumed
    run_stage(tmp_path, tiny_params(**TRAIN, save_strategy="steps", save_steps=2), "train", *paths(tmp_path / "one"))
    from safetensors.torch import load_file

    want, got = (load_file(d / "train" / "model" / "model.safetensors") for d in (tmp_path / "one", out))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)
