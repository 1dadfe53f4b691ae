"""Throughput and peak memory of normalize and tokenize at two dataset sizes.

    python benchmarks/tokenize_memory.py                  # 10,000 and 100,000 pairs
    python benchmarks/tokenize_memory.py --sizes 1000 20000 --num-proc 2 --format standard

For each size it writes N synthetic conversational pairs (system + user prompt, assistant answers
of varied length, every pair distinct) to a JSON Lines file, then runs the library calls of the
normalize and of the tokenize stage, each in a fresh Python process, so each peak RSS
(`ru_maxrss`) belongs to that one run. Tokenization uses the built-in word-level tokenizer and its
chat template (or `--tokenizer DIR`, any local tokenizer directory). Prints rows/s, peak RSS and the
RSS after imports (the floor), and the peak-RSS growth from the smallest to the largest size;
exits 1 if that growth is above `--max-growth` (20%).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_pairs(path: Path, n: int, fmt: str, seed: int = 0) -> None:
    """N distinct pairs, streamed to disk (the generator holds one row at a time)."""
    from pipeline.builtin import task

    rng = random.Random(seed)
    words = [w for w in task.vocabulary() if w.isalpha()]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            question = f"{i} " + " ".join(rng.choices(words, k=rng.randint(15, 60)))
            good = " ".join(rng.choices(task.POSITIVE + task.NOUNS, k=rng.randint(8, 80)))
            bad = " ".join(rng.choices(task.NEGATIVE + task.NOUNS, k=rng.randint(8, 80)))
            if fmt == "conversational":
                row = {
                    "prompt": [{"role": "system", "content": task.SYSTEM}, {"role": "user", "content": question}],
                    "chosen": [{"role": "assistant", "content": good}],
                    "rejected": [{"role": "assistant", "content": bad}],
                }
            else:
                row = {"prompt": question, "chosen": " " + good, "rejected": " " + bad}
            f.write(json.dumps(row) + "\n")


def child(args) -> None:
    """One measured run in this fresh process; prints one JSON line."""
    from pipeline.config.params import check_params
    from pipeline.store.artifacts import staged_dir

    work = Path(args.workdir)
    params = check_params(
        {
            "data": {"train": str(work / "pairs.jsonl"), "eval_fraction": 0.05},
            "tokenize": {"max_length": 1024, "dataset_num_proc": args.num_proc},
        }
    )
    if args.stage == "normalize":
        from pipeline.data.normalize import normalize_dataset

        write_pairs(work / "pairs.jsonl", args.rows, args.format)
        floor = rss_mib()
        start = time.perf_counter()
        with staged_dir(work / "normalized") as out:
            report = normalize_dataset(params, out)
        rows = report["rows_read"]
    else:
        from pipeline.data.tokenize import tokenize_dataset

        if args.tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        else:
            from pipeline.builtin.tokenizer import build_tokenizer

            tokenizer = build_tokenizer()
        floor = rss_mib()
        start = time.perf_counter()
        with staged_dir(work / "tokenized") as out:
            report = tokenize_dataset(tokenizer, work / "normalized", out, params)
        rows = sum(split["rows_read"] for split in report.values())
    seconds = time.perf_counter() - start
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest worker process, if any
    print(
        json.dumps(
            {
                "stage": args.stage,
                "rows": rows,
                "seconds": seconds,
                "rows_per_s": rows / seconds,
                "floor_rss_mib": floor,
                "peak_rss_mib": peak_rss_mib(),
                "worker_peak_rss_mib": workers,
            }
        )
    )


def measure(stage: str, rows: int, workdir: Path, args) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        stage,
        "--rows",
        str(rows),
        "--workdir",
        str(workdir),
        "--format",
        args.format,
    ]
    if args.num_proc:
        command += ["--num-proc", str(args.num_proc)]
    if args.tokenizer:
        command += ["--tokenizer", args.tokenizer]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{stage} at {rows} rows failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--format", choices=("conversational", "standard"), default="conversational")
    parser.add_argument("--num-proc", type=int, default=None, help="tokenize.dataset_num_proc")
    parser.add_argument("--tokenizer", default=None, help="a local tokenizer directory (default: the built-in one)")
    parser.add_argument("--max-growth", type=float, default=0.20)
    parser.add_argument("--child", choices=("normalize", "tokenize"), help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(argparse.Namespace(**{**vars(args), "stage": args.child}))

    results = {}
    print(
        f"{'stage':<10}{'pairs':>9}{'rows/s':>10}{'seconds':>9}{'RSS after imports':>19}{'peak RSS':>11}"
        f"{'worker peak RSS':>17}"
    )
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
            for stage in ("normalize", "tokenize"):
                r = results[(stage, size)] = measure(stage, size, Path(tmp), args)
                print(
                    f"{stage:<10}{size:>9,}{r['rows_per_s']:>10,.0f}{r['seconds']:>9.1f}"
                    f"{r['floor_rss_mib']:>15.0f} MiB{r['peak_rss_mib']:>7.0f} MiB"
                    f"{(format(r['worker_peak_rss_mib'], '>13.0f') + ' MiB') if r['worker_peak_rss_mib'] else '':>17}",
                    flush=True,
                )
    small, large = min(args.sizes), max(args.sizes)
    failed = False
    for stage in ("normalize", "tokenize"):
        for key, what in (("peak_rss_mib", "peak RSS"), ("worker_peak_rss_mib", "worker peak RSS")):
            a, b = results[(stage, small)][key], results[(stage, large)][key]
            if not a:
                continue
            growth = (b - a) / a
            failed |= growth > args.max_growth
            print(
                f"{stage}: {what} {a:.0f} MiB at {small:,} pairs -> {b:.0f} MiB at {large:,} pairs: "
                f"{growth:+.1%} (limit {args.max_growth:+.0%})"
            )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
