"""Where a run ran: the machine and library facts that change its numbers.

Recorded in every artifact manifest and in `results/eval.json` (under `environment`), so a comparison of two runs
says when they come from different machines. Only what stays the same from run to run on one machine is recorded
(no time, host name or process id): outputs stay byte-identical on one machine, and differ across machines.
"""

from __future__ import annotations

import platform
import re
from importlib import metadata
from pathlib import Path

from pipeline.core.distributed import world_size_from_env

CPUINFO = Path("/proc/cpuinfo")
# the CPU features that choose the kernels torch runs (vector width, fused multiply-add, matrix units)
_NUMERIC_FLAGS = re.compile(r"^(sse4_[12]|avx.*|fma|f16c|amx.*|asimd.*|sve.*|neon|bf16|i8mm)$")


def cpu_model(cpuinfo: str, fallback: str = "") -> str:
    """The CPU's model name from /proc/cpuinfo text (its first processor), else `fallback`."""
    for key in ("model name", "Model", "cpu model", "Hardware"):
        match = re.search(rf"^{re.escape(key)}\s*:\s*(.+?)\s*$", cpuinfo, re.M)
        if match:
            return re.sub(r"\s+", " ", match.group(1))
    return fallback


def cpu_flags(cpuinfo: str) -> str:
    """The numerics-relevant CPU flags (x86 `flags`, Arm `Features`) of the first processor, sorted, space-joined."""
    match = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", cpuinfo, re.M)
    return " ".join(sorted(f for f in (match.group(1).split() if match else []) if _NUMERIC_FLAGS.match(f)))


def describe(
    cpuinfo: str,
    *,
    machine: str,
    python: str,
    torch_version: str,
    transformers_version: str,
    cuda: str | None,
    cpu_capability: str | None,
    threads: int,
    processes: int,
    gpus: list[str],
) -> dict:
    """The environment record (pure): what `environment()` writes, from the facts it gathered."""
    return {
        "cpu": cpu_model(cpuinfo, fallback=machine),
        "cpu_flags": cpu_flags(cpuinfo),
        "cpu_capability": cpu_capability or "unknown",
        "machine": machine,
        "threads": threads,
        "processes": processes,
        "gpu": ", ".join(gpus) if gpus else "none",
        "cuda": cuda or "none",
        "torch": torch_version,
        "transformers": transformers_version,
        "python": python,
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _gpus(torch) -> list[str]:
    """The CUDA devices, named, when this process initialized CUDA (a run on the CPU records none; asking would
    initialize CUDA, which a process that forks workers afterwards must not do)."""
    if not torch.cuda.is_initialized():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def environment() -> dict:
    """This process's environment record (see `describe`)."""
    import torch

    try:
        cpuinfo = CPUINFO.read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: None)()
    return describe(
        cpuinfo,
        machine=platform.machine(),
        python=platform.python_version(),
        torch_version=torch.__version__,
        transformers_version=_version("transformers"),
        cuda=torch.version.cuda,
        cpu_capability=capability,
        threads=torch.get_num_threads(),
        processes=world_size_from_env(),
        gpus=_gpus(torch),
    )
