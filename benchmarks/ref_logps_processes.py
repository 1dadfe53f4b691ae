"""`ref-logps` wall time for 1 and 2 (or more) processes on the same rows, launched the way the pipeline launches
them (`torchrun`, gloo on the CPU), and whether the values agree.

A tokenized artifact of `--pairs` random pairs (prompt and completions of ~`--length` tokens each) is written once;
then for each process count `torch.distributed.run` starts that many workers, each of which loads the same
Llama-style model (built in code, seeded) and runs `write_reference_logps` (the library call of `dpo ref-logps`):
rank k scores blocks k, k + n, ..., rank 0 writes them. Each worker uses `--threads` threads (default 1, so n processes use n cores: the scaling of
the sharding itself); the wall time is the launcher's, start-up included, and the pass's own, measured inside rank 0.

    python benchmarks/ref_logps_processes.py                      # 1 and 2 processes, 2,000 pairs
    python benchmarks/ref_logps_processes.py --processes 1 2 4 --pairs 8000
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _baseline import ROOT  # noqa: E402
from ref_logps_memory import max_difference, write_tokenized  # noqa: E402


def worker(opts: dict) -> None:
    sys.path.insert(0, str(ROOT))
    from types import SimpleNamespace

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.core.distributed import init_process_group, is_main
    from pipeline.objective.reference import Reference
    from pipeline.run.reference_pass import write_reference_logps

    init_process_group()
    torch.set_num_threads(opts["threads"])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=opts["vocab"],
        hidden_size=opts["hidden"],
        intermediate_size=4 * opts["hidden"],
        num_hidden_layers=opts["layers"],
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=8 * opts["length"],
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    start = time.perf_counter()
    rows = write_reference_logps(
        Reference("policy", model, ""),
        Path(opts["tokenized"]),
        SimpleNamespace(pad_token_id=0),
        opts["batch_size"],
        Path(opts["out"]),
        prefix_sharing=True,
        packing=True,
    )
    if is_main():
        Path(opts["out"], "seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - start, "rows": rows}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--length", type=int, default=120)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="threads per process (1: n processes use n cores)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        worker(json.loads(cli.worker))
        return

    cores = os.cpu_count() or 1
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenized = Path(tmp) / "tokenized"
        write_tokenized(tokenized, cli.pairs, cli.vocab, cli.length)
        for n in cli.processes:
            out = Path(tmp) / f"out-{n}"
            out.mkdir()
            opts = {
                "tokenized": str(tokenized),
                "out": str(out),
                "vocab": cli.vocab,
                "hidden": cli.hidden,
                "layers": cli.layers,
                "length": cli.length,
                "batch_size": cli.batch_size,
                "threads": cli.threads,
            }
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(n),
                "--master_port",
                str(free_port()),
                __file__,
                "--worker",
                json.dumps(opts),
            ]
            start = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                raise SystemExit(f"{n} processes failed:\n{proc.stderr[-4000:]}")
            inner = json.loads((out / "seconds.json").read_text())
            results[n] = {"wall": wall, "pass": inner["seconds"], "pairs": sum(inner["rows"].values()), "out": out}
        first = results[cli.processes[0]]
        print(
            f"ref-logps: {first['pairs']:,} pairs (~{3 * cli.length} tokens each), Llama-style hidden {cli.hidden}, "
            f"{cli.layers} layers, vocabulary {cli.vocab:,}; {cores} cores; prefix-shared, packed batches"
        )
        header = f"{'processes':>9} {'threads each':>12} {'launch wall s':>13} {'pass s':>7} {'pairs/s':>8} {'speed-up':>8} {'max |diff|':>10}"
        print(header + "\n" + "-" * len(header))
        for n, r in results.items():
            diff = max_difference(first["out"], r["out"])
            print(
                f"{n:>9} {cli.threads:>12} {r['wall']:>13.1f} {r['pass']:>7.1f} "
                f"{r['pairs'] / r['pass']:>8.1f} {first['pass'] / r['pass']:>7.2f}x {diff:>10.1e}"
            )


if __name__ == "__main__":
    main()
