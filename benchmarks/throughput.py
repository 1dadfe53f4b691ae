"""End-to-end DPO throughput on the shared HH-RLHF pairs: the reference pass and one epoch of training, at the
defaults, against today's padded full-logits path measured side by side in the same run.

The pairs are the first `--pairs` of `shared/data/hh-rlhf/harmless-base-test.jsonl.gz` with a non-empty final
turn, split at the last "\\n\\nAssistant:" both completions share (the implicit prompt) and tokenized with a
byte-level BPE tokenizer trained here on that file (8,192 tokens); a prompt keeps its last 384 tokens, a
completion is cut to fit `--max-length` (512) with its prompt. Each path runs in a fresh Python process, from the
same pre-tokenized pairs and the same initial weights (a Llama-style model built in code, fp32, CPU):
`DPOTrainer(..., precompute_ref_log_probs=True)` (the reference pass, inside the constructor) then `.train()`
for one epoch of `--batch` pairs per step, every other option at its default. The baseline is the `pipeline`
package of commit 65b108f (`benchmarks/_baseline.py`): padded batches, full-vocabulary logits.

    python benchmarks/throughput.py                   # ~4M and ~21M parameters
    python benchmarks/throughput.py --sizes 21M --all # also the packed and padding-free layouts

Printed per path: seconds of the reference pass and of training, pairs/s and tokens/s end to end (tokens: the
pairs' own, prompt counted with each completion, the same number for every path), the tokens the model ran
(padding included; prefix sharing runs each prompt once), the first step's logps/chosen and the last step's loss
(which must agree).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _baseline import BASELINE_REV, ROOT, baseline_root, run_worker, use_package  # noqa: E402

HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
MARKER = "\n\nAssistant:"
SIZES = {"4M": dict(hidden=128, layers=6, heads=4, pairs=128), "21M": dict(hidden=384, layers=8, heads=6, pairs=64)}
TARGET = 2.5  # end-to-end speed-up at defaults on the ~21M model
LAYOUTS = {  # this checkout's DPOConfig options per path; the baseline knows none of them
    "defaults (prefix-shared, packed)": {},
    "padded (chunked head only)": {"prefix_sharing": False, "packing": False},
    "packed, no prefix sharing": {"prefix_sharing": False},
    "padding_free=True": {"prefix_sharing": False, "packing": False, "padding_free": True},
}


def hh_pairs(limit: int) -> list[dict]:
    pairs = []
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            cut = row["chosen"].rfind(MARKER) + len(MARKER)
            prompt = row["chosen"][:cut]
            chosen, rejected = row["chosen"][cut:], row["rejected"][cut:]
            if row["rejected"].startswith(prompt) and chosen.strip() and rejected.strip() and chosen != rejected:
                pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            if len(pairs) == limit:
                break
    return pairs


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=8192,
            special_tokens=["<pad>", "<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tokenized_pairs(limit: int, max_length: int, save_to: Path) -> tuple[list[dict], int]:
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        texts = [t for line in f for t in json.loads(line).values()]
    tokenizer = build_tokenizer(texts)
    tokenizer.save_pretrained(save_to)
    rows = []
    for i, pair in enumerate(hh_pairs(limit)):
        prompt = tokenizer(pair["prompt"])["input_ids"][-384:]
        room = max_length - len(prompt)
        sides = {
            side: (tokenizer(pair[side])["input_ids"] + [tokenizer.eos_token_id])[:room]
            for side in ("chosen", "rejected")
        }
        rows.append(
            {"row_id": str(i), "prompt_ids": prompt, "chosen_ids": sides["chosen"], "rejected_ids": sides["rejected"]}
        )
    return rows, len(tokenizer)


def worker(opts: dict) -> dict:
    use_package(opts["root"])
    import datasets
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline import DPOConfig, DPOTrainer

    torch.set_num_threads(opts["threads"])
    rows = json.loads(Path(opts["data"]).read_text())

    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(opts["tokenizer"])  # its pad id only: the pairs are ids already
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=opts["vocab"],
        hidden_size=opts["hidden"],
        intermediate_size=opts["hidden"] * 8 // 3,
        num_hidden_layers=opts["layers"],
        num_attention_heads=opts["heads"],
        num_key_value_heads=opts["heads"],
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out,
            report_to="none",
            num_train_epochs=1,
            per_device_train_batch_size=opts["batch"],
            per_device_eval_batch_size=opts["batch"],
            precompute_ref_log_probs=True,
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            use_cpu=True,
            dataloader_pin_memory=False,
            gradient_checkpointing=opts["gradient_checkpointing"],
            **opts["options"],
        )
        start = time.perf_counter()
        trainer = DPOTrainer(
            model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer
        )
        built = time.perf_counter()
        trainer.train()
        done = time.perf_counter()
    first = next(h for h in trainer.state.log_history if "rewards/margins" in h)
    batches = [rows[i : i + opts["batch"]] for i in range(0, len(rows), opts["batch"])]
    model_tokens = sum(int(trainer.data_collator(b)["input_ids"].numel()) for b in batches)
    return {
        "ref_seconds": built - start,
        "train_seconds": done - built,
        "first_logps": first["logps/chosen"],
        "last_loss": trainer.state.log_history[-2]["loss"],
        "model_tokens": model_tokens,
        "num_params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--pairs", type=int, help="pairs per size (default: 128 at 4M, 64 at 21M)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-gradient-checkpointing", action="store_true", help="(DPOConfig's default is on)")
    parser.add_argument(
        "--all", action="store_true", help="also the packed and padding-free layouts, and padded with the chunked head"
    )
    parser.add_argument("--baseline-rev", default=BASELINE_REV)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        print(json.dumps(worker(json.loads(cli.worker))))
        return

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        baseline = str(baseline_root(cli.baseline_rev, Path(tmp)))
        for size in cli.sizes:
            shape = SIZES[size]
            rows, vocab = tokenized_pairs(cli.pairs or shape["pairs"], cli.max_length, Path(tmp) / "tokenizer")
            data = Path(tmp) / f"pairs-{size}.json"
            data.write_text(json.dumps(rows))
            tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
            shared = sum(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
            common = {
                **shape,
                "vocab": vocab,
                "batch": cli.batch,
                "threads": cli.threads,
                "data": str(data),
                "tokenizer": str(Path(tmp) / "tokenizer"),
                "gradient_checkpointing": not cli.no_gradient_checkpointing,
            }
            paths = {f"padded, full logits ({cli.baseline_rev})": (baseline, {})}
            for name, options in LAYOUTS.items():
                if cli.all or not options:
                    paths[name] = (str(ROOT), options)
            runs = {
                name: run_worker(__file__, {**common, "root": root, "options": options})
                for name, (root, options) in paths.items()
            }
            results[size] = {"pairs": len(rows), "tokens": tokens, "runs": runs}
            report(size, len(rows), tokens, shared, runs, vocab, cli)
    if cli.json:
        cli.json.write_text(json.dumps(results, indent=1))


def report(size: str, pairs: int, tokens: int, shared: int, runs: dict, vocab: int, cli) -> None:
    some = next(iter(runs.values()))
    print(
        f"\n== {size}: Llama-style, {some['num_params'] / 1e6:.1f}M parameters, vocabulary {vocab:,}; {pairs} HH-RLHF "
        f"pairs, {tokens:,} tokens (prompt counted with each completion; {shared:,} with each prompt once: "
        f"{tokens / shared:.2f}x fewer); batch {cli.batch}, max_length {cli.max_length}, gradient checkpointing "
        f"{'off' if cli.no_gradient_checkpointing else 'on'}, {cli.threads} threads"
    )
    header = f"{'path':<38} {'ref s':>7} {'train s':>8} {'pairs/s':>8} {'tokens/s':>9} {'model tokens':>12} {'speed-up':>8} {'logps/chosen@1':>14} {'last loss':>10}"
    print(header + "\n" + "-" * len(header))
    base = next(iter(runs.values()))
    base_total = base["ref_seconds"] + base["train_seconds"]
    for name, r in runs.items():
        total = r["ref_seconds"] + r["train_seconds"]
        print(
            f"{name:<38} {r['ref_seconds']:>7.1f} {r['train_seconds']:>8.1f} {pairs / total:>8.2f} {tokens / total:>9.0f} "
            f"{r['model_tokens']:>12,} {base_total / total:>7.2f}x {r['first_logps']:>14.4f} {r['last_loss']:>10.6f}"
        )
    default = runs["defaults (prefix-shared, packed)"]
    speedup = base_total / (default["ref_seconds"] + default["train_seconds"])
    print(
        f"model tokens per training epoch, baseline / defaults: {base['model_tokens'] / default['model_tokens']:.2f}x"
    )
    if size == "21M":
        print(
            f"target: defaults >= {TARGET}x the padded path end to end: {'met' if speedup >= TARGET else 'NOT met'} ({speedup:.2f}x)"
        )


if __name__ == "__main__":
    main()
