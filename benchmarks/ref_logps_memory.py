"""Peak memory of the `ref-logps` pass against the number of pairs: the streaming pass against today's, which holds
the whole split as Python lists and writes once at the end, measured side by side.

For each size, a tokenized artifact of long pairs (~750 tokens: prompts, chosen and rejected completions of
~250 tokens each, random ids) is written first; then each path computes the reference log-probs of both splits
(`pipeline.run.reference_pass.write_reference_logps`, the library call of `dpo ref-logps`) in a fresh Python process and
reports its peak resident set size (`ru_maxrss`) and throughput. The model is a small Llama-style one built in
code (the figures are about what grows with the number of pairs; the per-batch memory is the same at every size).
The baseline is the `pipeline` package of commit 65b108f (`benchmarks/_baseline.py`). The script checks that
both paths wrote the same values and exits 1 if the streaming pass's peak RSS grows more than 10%.

    python benchmarks/ref_logps_memory.py                       # 2,000 and 8,000 pairs
    python benchmarks/ref_logps_memory.py --sizes 1000 4000 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _baseline import BASELINE_REV, ROOT, baseline_root, peak_rss_mb, run_worker, use_package  # noqa: E402

MAX_GROWTH = 0.10


def write_tokenized(directory: Path, pairs: int, vocab: int, length: int, seed: int = 0) -> None:
    """A tokenized artifact: `pairs` train pairs (and a tenth as many eval pairs), written in row groups."""
    sys.path.insert(0, str(ROOT))
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.schema import TOKENIZED_SCHEMA
    from pipeline.store.artifacts import write_manifest

    rng = random.Random(seed)

    def ids():
        return [rng.randrange(10, vocab) for _ in range(rng.randint(int(0.9 * length), int(1.1 * length)))]

    directory.mkdir(parents=True)
    for split, n in (("train", pairs), ("eval", pairs // 10)):
        with pq.ParquetWriter(directory / f"{split}.parquet", TOKENIZED_SCHEMA) as writer:
            for start in range(0, n, 1000):
                rows = [
                    {"row_id": f"{split}-{i}", "prompt_ids": ids(), "chosen_ids": ids(), "rejected_ids": ids()}
                    for i in range(start, min(n, start + 1000))
                ]
                writer.write_table(pa.Table.from_pylist(rows, schema=TOKENIZED_SCHEMA))
    write_manifest(directory, "tokenize", {}, {})


def worker(opts: dict) -> dict:
    use_package(opts["root"])
    from types import SimpleNamespace

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.objective.reference import Reference
    from pipeline.run.reference_pass import write_reference_logps

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=opts["vocab"],
        hidden_size=opts["hidden"],
        intermediate_size=2 * opts["hidden"],
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4 * opts["length"],
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    before = peak_rss_mb()
    start = time.perf_counter()
    rows = write_reference_logps(
        Reference("policy", model, ""),
        Path(opts["tokenized"]),
        SimpleNamespace(pad_token_id=0),
        opts["batch_size"],
        Path(opts["out"]),
    )
    seconds = time.perf_counter() - start
    return {
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": before,
        "pairs": sum(rows.values()),
        "pairs_per_s": sum(rows.values()) / seconds,
    }


def max_difference(a: Path, b: Path) -> float:
    import numpy as np
    import pyarrow.parquet as pq

    worst = 0.0
    for split in ("train", "eval"):
        x, y = pq.read_table(a / f"{split}.parquet"), pq.read_table(b / f"{split}.parquet")
        assert x["row_id"].to_pylist() == y["row_id"].to_pylist()
        for column in ("ref_chosen_logps", "ref_rejected_logps"):
            worst = max(worst, float(np.abs(x[column].to_numpy() - y[column].to_numpy()).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000], help="train pairs (eval: a tenth more)")
    parser.add_argument("--length", type=int, default=250, help="mean tokens of a prompt and of each completion")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument(
        "--batch-size", type=int, default=64, help="pairs per batch (ref_logps.precompute_ref_batch_size)"
    )
    parser.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the baseline package")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        print(json.dumps(worker(json.loads(cli.worker))))
        return

    shape = {"vocab": cli.vocab, "hidden": cli.hidden, "length": cli.length, "batch_size": cli.batch_size}
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        roots = {
            "streaming (this checkout)": str(ROOT),
            f"lists ({cli.baseline_rev})": str(baseline_root(cli.baseline_rev, tmp / "baseline")),
        }
        for size in cli.sizes:
            tokenized = tmp / f"tokenized-{size}"
            write_tokenized(tokenized, size, cli.vocab, cli.length)
            outs = []
            for i, (name, root) in enumerate(roots.items()):
                out = tmp / f"ref-{size}-{i}"
                out.mkdir()
                result = run_worker(__file__, {**shape, "root": root, "tokenized": str(tokenized), "out": str(out)})
                results.setdefault(name, []).append({"size": size, **result})
                outs.append(out)
            difference = max_difference(*outs)
            print(f"{size:,} pairs: largest difference of a summed log-prob between the paths: {difference:.2e}")
    print(
        f"\nmodel: Llama-style, hidden {cli.hidden}, vocabulary {cli.vocab:,}; pairs of ~{3 * cli.length} tokens; "
        f"{cli.batch_size} pairs per batch; CPU, one fresh process per row"
    )
    header = f"{'path':<28} {'train pairs':>11} {'peak RSS MB':>11} {'pairs/s':>8}"
    print(header + "\n" + "-" * len(header))
    for name, rows in results.items():
        for r in rows:
            print(f"{name:<28} {r['size']:>11,} {r['peak_rss_mb']:>11.0f} {r['pairs_per_s']:>8.1f}")
    growth = {name: rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"] - 1 for name, rows in results.items()}
    added = {name: rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"] for name, rows in results.items()}
    print(
        f"\npeak RSS growth from {cli.sizes[0]:,} to {cli.sizes[-1]:,} pairs: "
        + "; ".join(f"{name}: {growth[name]:+.1%} ({added[name]:+.0f} MB)" for name in results)
    )
    new, old = (rows[-1]["peak_rss_mb"] for rows in results.values())
    print(f"peak RSS ratio at {cli.sizes[-1]:,} pairs (lists / streaming): {old / new:.2f}x")
    if cli.json:
        cli.json.write_text(json.dumps(results, indent=1))
    streaming = next(iter(growth.values()))
    if streaming > MAX_GROWTH:
        print(f"streaming peak RSS grew {streaming:.1%} > {MAX_GROWTH:.0%}")
        sys.exit(1)


if __name__ == "__main__":
    main()
