"""GPU training throughput of the batch layouts: padded, packed and prefix-shared (SDPA with a dense mask, and
FlexAttention with a block-sparse one), on a Qwen-shaped ~0.5B model built from a config, bf16.

Each layout trains `--steps` DPO steps (after `--warmup` untimed ones) of `--batch` pairs with precomputed
reference log-probs, through `DPOTrainer`, from the same initial weights. The pairs are random tokens with the
HH-RLHF shape scaled to `--max-length` (prompt 40%, chosen and rejected up to 30% each, lengths drawn per pair).
Reported per layout: tokens/s (the pairs' own tokens, prompt counted with each completion: the same work for
every layout), the tokens the model ran, model FLOP utilisation (6 x non-embedding parameters x tokens run
without padding + attention, over the time and the GPU's dense bf16 peak, `--peak-tflops`), and the peak memory
(`torch.cuda.max_memory_allocated`).

    python benchmarks/gpu_layouts.py                    # on a CUDA machine
    python benchmarks/gpu_layouts.py --tiny --steps 1   # a smoke run of the code path on the CPU (no figures)
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch

LAYOUTS = {
    "padded": ("sdpa", {"prefix_sharing": False, "packing": False}),
    "packed": ("sdpa", {"prefix_sharing": False, "packing": True}),
    "prefix-shared, sdpa": ("sdpa", {"prefix_sharing": True, "packing": True}),
    "prefix-shared, flex": ("flex_attention", {"prefix_sharing": True, "packing": True}),
}
QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151_936, tie_word_embeddings=True, max_position_embeddings=32768)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1024, tie_word_embeddings=True, max_position_embeddings=4096)


def pairs(n: int, max_length: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def ids(k):
        return [rng.randrange(3, vocab) for _ in range(max(1, k))]
    rows = []
    for i in range(n):
        p = int(max_length * 0.4 * rng.uniform(0.3, 1.0))
        c, r = (int(max_length * 0.3 * rng.uniform(0.2, 1.0)) for _ in range(2))
        rows.append({"row_id": str(i), "prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r),
                     "ref_chosen_logps": -2.0 * c, "ref_rejected_logps": -2.0 * r})
    return rows


def run(layout: str, shape: dict, rows: list[dict], cli) -> dict:
    import datasets
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, TrainerCallback
    from tokenizers import Tokenizer, models

    from pipeline import DPOConfig, DPOTrainer

    attn, options = LAYOUTS[layout]
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**shape, attn_implementation=attn)).to(
        "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1}, "<pad>")),
                                        pad_token="<pad>", eos_token="<eos>")
    steps = cli.warmup + cli.steps
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, report_to="none", max_steps=steps, per_device_train_batch_size=cli.batch,
                         precompute_ref_log_probs=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                         bf16=cuda, gradient_checkpointing=True, learning_rate=1e-6, **options)
        trainer = DPOTrainer(model, args=args, train_dataset=datasets.Dataset.from_list(rows[:steps * cli.batch]),
                             processing_class=tokenizer)
        if trainer.layout != {**{"padding_free": False}, **options}:
            return {"skipped": f"the model took {trainer.layout}"}
        times = []

        class StepClock(TrainerCallback):  # wall time of each optimizer step, synchronised
            def on_step_begin(self, *args, **kwargs):
                if cuda:
                    torch.cuda.synchronize()
                times.append(-time.perf_counter())

            def on_step_end(self, *args, **kwargs):
                if cuda:
                    torch.cuda.synchronize()
                times[-1] += time.perf_counter()
        trainer.add_callback(StepClock())
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    timed = rows[cli.warmup * cli.batch:steps * cli.batch]
    batches = [timed[i:i + cli.batch] for i in range(0, len(timed), cli.batch)]
    run_tokens = sum(int(trainer.data_collator(b)["input_ids"].numel()) for b in batches)
    real_tokens = sum(len(r["prompt_ids"]) * (1 if options["prefix_sharing"] else 2) + len(r["chosen_ids"])
                      + len(r["rejected_ids"]) for r in timed)
    pair_tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in timed)
    seconds = sum(times[cli.warmup:])
    embedding = shape["vocab_size"] * shape["hidden_size"]
    params = sum(p.numel() for p in model.parameters()) - embedding
    ctx = cli.max_length / 2  # mean causal context, roughly
    flops = real_tokens * (6 * params + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * ctx) \
        + 6 * embedding * real_tokens  # the output layer (tied) runs on every position
    return {"tokens_per_s": pair_tokens / seconds, "run_tokens": run_tokens, "seconds": seconds,
            "mfu": flops / seconds / (cli.peak_tflops * 1e12) if cuda else None,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--tiny", action="store_true", help="a tiny model: checks the code path, e.g. on the CPU")
    cli = parser.parse_args()
    shape = TINY if cli.tiny else QWEN_05B
    rows = pairs((cli.warmup + cli.steps) * cli.batch, cli.max_length, shape["vocab_size"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no figures: the code path only)"
    print(f"{device}; {'tiny' if cli.tiny else 'Qwen2-0.5B-shaped'} model, batch {cli.batch} pairs, max_length "
          f"{cli.max_length}, {cli.steps} timed steps after {cli.warmup}, bf16, gradient checkpointing")
    header = f"{'layout':<22} {'tokens/s':>10} {'model tokens':>13} {'MFU':>6} {'peak GB':>8}"
    print(header + "\n" + "-" * len(header))
    for layout in cli.layouts:
        try:
            r = run(layout, shape, rows, cli)
        except Exception as err:  # noqa: BLE001 - one layout's failure (e.g. flex on an old GPU) is reported, not fatal
            print(f"{layout:<22} failed: {type(err).__name__}: {str(err)[:200]}")
            continue
        if "skipped" in r:
            print(f"{layout:<22} skipped: {r['skipped']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "-"
        print(f"{layout:<22} {r['tokens_per_s']:>10.0f} {r['run_tokens']:>13,} {mfu:>6} {peak:>8}")


if __name__ == "__main__":
    main()
