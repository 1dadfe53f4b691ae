"""Peak memory of DPO training: LoRA with precomputed reference log-probs vs full fine-tuning with an online reference.

Each configuration runs in a fresh Python process (so peaks do not mix) that builds the same Llama-style
model in code (81M parameters at the defaults, fp32 weights 310 MB; short sequences, so that the weights
dominate), trains a few DPO steps on random token pairs on the CPU, and reports its peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`). The table puts the configurations side by side, with the
growth over the process's size before the model was built expressed in copies of the weights:

- full fine-tuning + online reference: policy + frozen reference copy + gradients + two AdamW moments (~5 copies);
- LoRA + precomputed reference: the base weights once (the reference is the same base with the adapter
  disabled, run once before training), plus a small adapter and its optimizer state (~1 copy).

    python benchmarks/lora_memory.py                 # defaults: hidden 768, 8 layers, vocab 16000 (untied)
    python benchmarks/lora_memory.py --all           # also LoRA online and full fine-tuning precomputed
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

CONFIGS = {
    "full+online": {"peft": False, "precompute": False, "label": "full fine-tuning, online reference"},
    "lora+precomputed": {"peft": True, "precompute": True, "label": "LoRA, precomputed reference"},
    "lora+online": {"peft": True, "precompute": False, "label": "LoRA, online reference (adapter off)"},
    "full+precomputed": {"peft": False, "precompute": True, "label": "full fine-tuning, precomputed reference"},
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(name: str, opts: dict) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import datasets
    import peft  # noqa: F401  (imported here by every configuration, so the baseline below includes it)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline import DPOConfig, DPOTrainer
    from pipeline.builtin.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()  # only its pad/eos ids are used: the data below are token ids already
    before_model = peak_rss_mb()
    config = LlamaConfig(
        vocab_size=opts["vocab"],
        hidden_size=opts["hidden"],
        intermediate_size=opts["intermediate"],
        num_hidden_layers=opts["layers"],
        num_attention_heads=opts["heads"],
        num_key_value_heads=opts["heads"],
        max_position_embeddings=512,
        tie_word_embeddings=False,  # tying would allocate, then drop, a second output matrix
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    num_params = sum(p.numel() for p in model.parameters())
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    after_model = peak_rss_mb()

    rng = random.Random(0)
    n = opts["steps"] * opts["batch"]
    seq = opts["seq"] // 3

    def ids(k):
        return [rng.randrange(10, opts["vocab"]) for _ in range(k)]

    rows = [
        {"row_id": str(i), "prompt_ids": ids(seq), "chosen_ids": ids(seq), "rejected_ids": ids(seq)} for i in range(n)
    ]
    peft_config = None
    if opts["peft"]:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out,
            report_to="none",
            max_steps=opts["steps"],
            per_device_train_batch_size=opts["batch"],
            per_device_eval_batch_size=opts["batch"],
            precompute_ref_log_probs=opts["precompute"],
            gradient_checkpointing=False,
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            learning_rate=1e-5,
            use_cpu=True,
            dataloader_pin_memory=False,
        )
        start = time.perf_counter()
        trainer = DPOTrainer(
            model,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        kept_reference = trainer.ref_model is not None
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
        seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    return {
        "name": name,
        "num_params": num_params,
        "trainable_params": trainable,
        "weights_mb": weights_mb,
        "rss_before_model_mb": before_model,
        "rss_after_model_mb": after_model,
        "peak_rss_mb": peak,
        "weight_copies": (peak - before_model) / weights_mb,
        "separate_reference_model": kept_reference,
        "train_seconds": seconds,
    }


def run_config(name: str, opts: dict) -> dict:
    """One configuration in a fresh interpreter; its result is the last line of its stdout."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "DISABLE_TQDM": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", name, "--opts", json.dumps(opts)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--seq", type=int, default=48, help="tokens per sequence (prompt + completion)")
    parser.add_argument("--batch", type=int, default=1, help="pairs per step (small: the weights should dominate)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--all", action="store_true", help="also run LoRA online and full fine-tuning precomputed")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--opts", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        print(json.dumps(worker(cli.worker, json.loads(cli.opts))))
        return

    shape = {
        k: getattr(cli, k) for k in ("hidden", "intermediate", "layers", "heads", "vocab", "seq", "batch", "steps")
    }
    names = list(CONFIGS) if cli.all else ["full+online", "lora+precomputed"]
    results = [
        run_config(name, {**shape, **{k: v for k, v in CONFIGS[name].items() if k != "label"}}) for name in names
    ]
    first = results[0]
    print(
        f"model: Llama-style, {first['num_params'] / 1e6:.1f}M parameters, fp32 weights {first['weights_mb']:.0f} MB; "
        f"{cli.steps} steps of {cli.batch} pairs x {cli.seq} tokens, CPU, one fresh process per row"
    )
    header = f"{'configuration':<42} {'trainable':>11} {'ref model':>9} {'peak RSS MB':>11} {'growth MB':>10} {'x weights':>9} {'time s':>7}"
    print(header)
    print("-" * len(header))
    for r in results:
        growth = r["peak_rss_mb"] - r["rss_before_model_mb"]
        print(
            f"{CONFIGS[r['name']]['label']:<42} {r['trainable_params'] / 1e6:>10.2f}M {('copy' if r['separate_reference_model'] else 'none'):>9} "
            f"{r['peak_rss_mb']:>11.0f} {growth:>10.0f} {r['weight_copies']:>9.2f} {r['train_seconds']:>7.1f}"
        )
    by_name = {r["name"]: r for r in results}
    full, lora = by_name["full+online"], by_name["lora+precomputed"]
    extra = lambda r: r["peak_rss_mb"] - r["rss_before_model_mb"] - r["weights_mb"]  # noqa: E731
    print(
        f"\nLoRA + precomputed reference peaks at {lora['peak_rss_mb']:.0f} MB vs {full['peak_rss_mb']:.0f} MB "
        f"({full['peak_rss_mb'] / lora['peak_rss_mb']:.1f}x less): it grows by {lora['weight_copies']:.2f}x the weights, "
        f"i.e. one copy of the base weights plus {extra(lora):.0f} MB (activations, adapter, runtime buffers), against "
        f"{full['weight_copies']:.2f}x (policy, reference copy, gradients, two AdamW moments, activations)."
    )
    if cli.json:
        cli.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
