"""Many processes: the launcher command a stage re-runs itself under, who this process is, and the few collectives
the stages need (one writer per artifact, rows shared out by rank).

A stage started by `dpo <stage>` or `dvc repro` with `distributed.num_processes` × `num_machines` > 1 re-runs its
own command under a launcher and exits with the launcher's status: `torchrun` (`torch.distributed.run`) for plain
data parallelism, `accelerate launch` with `distributed.config_file` for FSDP or DeepSpeed. The launched processes
see `WORLD_SIZE`, join one process group (gloo on the CPU, NCCL on GPUs, through accelerate's `PartialState`, which
the Trainer then shares) and never launch again. Any rank that fails makes the launcher stop the others and exit
non-zero, with that rank's error shown; nothing is published, since only rank 0 renames an artifact into place,
after every rank has finished writing it (`pipeline.store.artifacts.staged_dir`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Inside a launcher's process group (torchrun/accelerate set WORLD_SIZE)."""
    return world_size_from_env() > 1


def total_processes(params: dict) -> int:
    d = params["distributed"]
    return d["num_processes"] * d["num_machines"]


def check_distributed(params: dict) -> None:
    """What the launcher cannot start, refused before anything runs."""
    d = params["distributed"]
    if d["config_file"] is not None and not Path(d["config_file"]).is_file():
        raise PipelineError(
            f"params: distributed.config_file: {d['config_file']} does not exist; use one of "
            "configs/accelerate/*.yaml or null."
        )
    if d["config_file"] is not None:
        import yaml

        try:
            engine = str((yaml.safe_load(Path(d["config_file"]).read_text()) or {}).get("distributed_type", ""))
        except yaml.YAMLError as err:
            raise PipelineError(
                f"params: distributed.config_file {d['config_file']} is not valid YAML: {err}"
            ) from None
        if engine in ("FSDP", "DEEPSPEED"):
            import torch

            if not torch.cuda.is_available():
                name = "DeepSpeed" if engine == "DEEPSPEED" else "FSDP"
                raise PipelineError(
                    f"params: distributed.config_file {d['config_file']} uses {name}, which needs CUDA "
                    "GPUs, and this machine has none (accelerate would run plain data parallelism "
                    "instead); use configs/accelerate/ddp.yaml or no config file on the CPU."
                )


def launch_command(params: dict, argv: list[str]) -> list[str] | None:
    """The command that runs `python -m stages.cli <argv>` as the processes `distributed` asks for, or None when one
    process is asked for or this process is already one of several."""
    if total_processes(params) == 1 or launched():
        return None
    check_distributed(params)
    d = params["distributed"]
    host = d["main_process_ip"] or "127.0.0.1"
    target = ["-m", "stages.cli", *argv]
    if d["config_file"]:
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            d["config_file"],
            "--num_processes",
            str(total_processes(params)),
            "--num_machines",
            str(d["num_machines"]),
            "--machine_rank",
            str(d["machine_rank"]),
            "--main_process_ip",
            host,
            "--main_process_port",
            str(d["main_process_port"]),
        ]
        if d["mixed_precision"]:
            command += ["--mixed_precision", d["mixed_precision"]]
        return command + target
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(d["num_processes"]),
        "--nnodes",
        str(d["num_machines"]),
        "--node_rank",
        str(d["machine_rank"]),
        "--master_addr",
        host,
        "--master_port",
        str(d["main_process_port"]),
        *target,
    ]


def relaunch(params: dict, argv: list[str]) -> int | None:
    """Run this stage command under the launcher `launch_command` gives, and return its exit status; None when this
    process is to do the work itself."""
    import subprocess

    command = launch_command(params, argv)
    if command is None:
        return None
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, env=env).returncode


# ---- inside the processes ------------------------------------------------------------------------------


def init_process_group() -> None:
    """Join the launcher's process group (once; accelerate's `PartialState`, which the Trainer then uses)."""
    if launched():
        from accelerate import PartialState

        PartialState()


def rank_and_size() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside a process group; a stage that never imported
    torch has none)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_size()[0] == 0


def barrier() -> None:
    import torch.distributed as dist

    if rank_and_size()[1] > 1:
        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    import torch.distributed as dist

    if rank_and_size()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    import torch.distributed as dist

    size = rank_and_size()[1]
    if size == 1:
        return [value]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, value)
    return out


def gather_to_main(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on rank 0 (the other ranks get an empty list)."""
    import torch.distributed as dist

    rank, size = rank_and_size()
    if size == 1:
        return [value]
    out: list[Any] | None = [None] * size if rank == 0 else None
    dist.gather_object(value, out, dst=0)
    return out or []


def my_share(items: list) -> list:
    """This rank's items of a list shared out across ranks: items rank, rank + size, ..."""
    rank, size = rank_and_size()
    return items[rank::size]


def gather_shares(mine: list, total: int) -> list:
    """The whole list back from every rank's `my_share` results, in the original order, on every rank."""
    shares = gather(mine)
    size = len(shares)
    return [shares[i % size][i // size] for i in range(total)]


# ---- a model before the Trainer has prepared it ----------------------------------------------------------------


@contextlib.contextmanager
def ready_for_forward(model, device):
    """`model` able to run forward passes on `device` before the Trainer prepares it (the layout probe, the reference
    pass): parameters that DeepSpeed ZeRO-3 partitioned at load are gathered (read-only) for the duration, and a
    model still on the CPU while training runs on CUDA (DeepSpeed and FSDP place it only when they wrap it) is moved
    to `device` and back. Anything else (a placed model, a 4-bit one, the CPU) is used as it is."""
    params = list(model.parameters())
    with contextlib.ExitStack() as stack:
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(params, modifier_rank=None))
        where = params[0].device if params else None
        move = (
            where is not None
            and where.type == "cpu"
            and getattr(device, "type", device) == "cuda"
            and not any(hasattr(p, "ds_id") for p in params)
            and not getattr(model, "is_loaded_in_4bit", False)
            and not getattr(model, "is_loaded_in_8bit", False)
            and not getattr(model, "hf_device_map", None)
        )
        if move:
            model.to(device)
        try:
            yield model
        finally:
            if move:
                model.to(where)
