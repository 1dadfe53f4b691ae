"""Peak memory of DPO training at a 151,936-token vocabulary: the chunked output layer against today's padded
full-logits path, measured side by side.

Each path trains a few steps of the same Qwen-sized-vocabulary model (hidden 256, tied embeddings, built in code,
fp32 on the CPU) on the same random pairs (4 pairs x 512 tokens per sequence: a 256-token prompt and 256-token
completions) with precomputed reference log-probs, in a fresh Python process, and reports its peak resident set
size (`ru_maxrss`), the seconds per step and the first step's logged metrics (which must agree). The baseline is
the `pipeline` package of commit 65b108f (`benchmarks/_baseline.py`), which materializes `[2N, L, V]` logits and
float copies of them for the log-probs and the diagnostics.

    python benchmarks/head_memory.py                      # chunked vs baseline, defaults above
    python benchmarks/head_memory.py --untied --steps 5   # an untied output layer
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

TARGET_MB = 1800
SHOWN = ("loss", "rewards/margins", "logps/chosen", "logits/chosen", "entropy", "mean_token_accuracy")


def worker(opts: dict) -> dict:
    use_package(opts["root"])
    import datasets
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline import DPOConfig, DPOTrainer
    from pipeline.builtin.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()  # only its pad/eos ids are used: the data below are token ids already
    after_imports = peak_rss_mb()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=opts["vocab"],
        hidden_size=opts["hidden"],
        intermediate_size=4 * opts["hidden"],
        num_hidden_layers=opts["layers"],
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2 * opts["seq"],
        tie_word_embeddings=not opts["untied"],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20

    rng = random.Random(0)
    half = opts["seq"] // 2

    def ids(k):
        return [rng.randrange(10, opts["vocab"]) for _ in range(k)]

    rows = [
        {
            "row_id": str(i),
            "prompt_ids": ids(half),
            "chosen_ids": ids(half),
            "rejected_ids": ids(half),
            "ref_chosen_logps": -half * 12.0 + rng.random(),
            "ref_rejected_logps": -half * 12.0 + rng.random(),
        }
        for i in range(opts["steps"] * opts["batch"])
    ]
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out,
            report_to="none",
            max_steps=opts["steps"],
            per_device_train_batch_size=opts["batch"],
            precompute_ref_log_probs=True,
            gradient_checkpointing=False,
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            learning_rate=1e-5,
            use_cpu=True,
            dataloader_pin_memory=False,
        )
        trainer = DPOTrainer(
            model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    first = next(h for h in trainer.state.log_history if "rewards/margins" in h)
    return {
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_mb": after_imports,
        "weights_mb": weights_mb,
        "num_params": sum(p.numel() for p in model.parameters()),
        "seconds_per_step": seconds / opts["steps"],
        "first_step": {k: first[k] for k in SHOWN},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence: half prompt, half completion")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--untied", action="store_true", help="an output layer of its own (default: tied to the embeddings)"
    )
    parser.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the baseline package")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        print(json.dumps(worker(json.loads(cli.worker))))
        return

    shape = {k: getattr(cli, k) for k in ("vocab", "hidden", "layers", "seq", "batch", "steps", "untied")}
    with tempfile.TemporaryDirectory() as tmp:
        roots = {
            "chunked (this checkout)": str(ROOT),
            f"full logits ({cli.baseline_rev})": str(baseline_root(cli.baseline_rev, Path(tmp))),
        }
        results = {name: run_worker(__file__, {**shape, "root": root}) for name, root in roots.items()}
    new, old = results.values()
    print(
        f"model: Llama-style, {new['num_params'] / 1e6:.1f}M parameters ({'untied' if cli.untied else 'tied'} output "
        f"layer), fp32 weights {new['weights_mb']:.0f} MB; vocabulary {cli.vocab:,}; {cli.steps} steps of {cli.batch} "
        f"pairs x {cli.seq} tokens, precomputed reference, CPU, one fresh process per row"
    )
    header = f"{'path':<28} {'peak RSS MB':>11} {'after imports MB':>16} {'growth MB':>9} {'s/step':>7}"
    print(header + "\n" + "-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<28} {r['peak_rss_mb']:>11.0f} {r['rss_after_imports_mb']:>16.0f} "
            f"{r['peak_rss_mb'] - r['rss_after_imports_mb']:>9.0f} {r['seconds_per_step']:>7.1f}"
        )
    growth = lambda r: r["peak_rss_mb"] - r["rss_after_imports_mb"]  # noqa: E731
    print(
        f"\npeak RSS ratio (full logits / chunked): {old['peak_rss_mb'] / new['peak_rss_mb']:.2f}x; growth over "
        f"imports: {growth(old) / growth(new):.2f}x; time per step: {old['seconds_per_step'] / new['seconds_per_step']:.2f}x"
    )
    print(f"target: chunked peak RSS <= {TARGET_MB} MB: {'met' if new['peak_rss_mb'] <= TARGET_MB else 'NOT met'}")
    print("\nfirst step's metrics (the same numbers):")
    for key in SHOWN:
        print(f"  {key:<22} {new['first_step'][key]:>14.6g} {old['first_step'][key]:>14.6g}")
    if cli.json:
        cli.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
