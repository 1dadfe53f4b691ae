"""The GPU path, checked and measured in one command: every CUDA route of the pipeline, each part timed and guarded.

Parts, in the order they run (`--parts` picks some):

- `env`: the GPU, the package versions, and the measured dense bf16 matmul rate (the MFU denominator).
- `fp32_cuda_vs_cpu`: one DPO step (loss and every gradient, reference log-probs precomputed on each device) of a
  small Qwen2-shaped model in fp32 on CUDA equals the CPU result (≤ 1e-4, TF32 off).
- `bf16_layouts`: in bf16, the packed, prefix-shared SDPA and prefix-shared Flex layouts give the padded layout's
  loss and gradients within bf16 tolerance; the layout probe picks what docs/speed-and-memory.md says (sdpa, eager and
  flex_attention take prefix sharing on CUDA; sliding-window attention falls back to packed).
- `speed`: a Qwen2.5-0.5B-shaped model built from its config, bf16, gradient checkpointing (the default), pairs of
  up to 2,048 tokens with HH-RLHF's prompt/completion split, precomputed reference: tokens/s, model FLOP utilisation
  against the measured matmul rate, and peak memory of each layout; then the reference pass in pairs/s.
- `liger`: Liger Kernel's fused DPO loss (compiled on CUDA, with its model kernels) against our chunked head: the
  same loss and gradients within bf16 tolerance; speed and peak memory of both routes.
- `qlora`: a 4-bit (NF4) base with a LoRA adapter trains 5 steps through the pipeline's loader: loss finite and
  falling, memory reported.
- `fsdp`, `zero2`, `zero3`: 3 steps under `accelerate launch` with the shipped config (one process) equal plain
  single-GPU training within bf16 tolerance (per-step losses and the weights' updates); `fsdp` also runs the
  FSDP-prepared online reference against plain training with an online reference.

Each part runs in a process of its own (`--isolate`, the default on CUDA), so a part that fails or crashes reports
its error and the rest still run; `--deadline-s` stops starting parts that would not finish in time. The results
go to `gpu_check.json` and `gpu_check.md` in `--out`.

    bash benchmarks/gpu_check.sh                    # on a CUDA machine (installs carried wheels first)
    python benchmarks/gpu_check.py --tiny           # the CPU rehearsal: tiny shapes, CUDA-only parts skipped by name
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PARTS = ("env", "fp32_cuda_vs_cpu", "bf16_layouts", "speed", "liger", "qlora", "fsdp", "zero2", "zero3")
# seconds a part may take on CUDA before its process is stopped (the CPU rehearsal takes far less)
BUDGET_S = {
    "env": 60,
    "fp32_cuda_vs_cpu": 90,
    "bf16_layouts": 150,
    "speed": 240,
    "liger": 150,
    "qlora": 120,
    "fsdp": 150,
    "zero2": 100,
    "zero3": 100,
}
ENGINE_CONFIGS = {
    "fsdp": "configs/accelerate/fsdp.yaml",
    "zero2": "configs/accelerate/deepspeed_zero2.yaml",
    "zero3": "configs/accelerate/deepspeed_zero3.yaml",
}
# (attention implementation, collator options) of each batch layout
LAYOUTS = {
    "padded": ("sdpa", {"prefix_sharing": False, "packing": False}),
    "packed": ("sdpa", {"prefix_sharing": False, "packing": True}),
    "prefix-shared sdpa": ("sdpa", {"prefix_sharing": True, "packing": True}),
    "prefix-shared flex": ("flex_attention", {"prefix_sharing": True, "packing": True}),
}
QWEN_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151_936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
)
SMALL = dict(
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=4096,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
)
# tolerances
FP32_TOL = 1e-4  # loss and gradients, CUDA against CPU (relative to the largest gradient)
BF16_LOSS_TOL = 2e-2  # |loss - padded loss|, relative to max(1, |loss|)
BF16_GRAD_COS = 0.99  # cosine of the flattened gradients with the padded layout's
BF16_GRAD_REL = 0.1  # ‖g - g_padded‖ / ‖g_padded‖
ENGINE_UPDATE_REL = 0.1  # ‖Δw_engine - Δw_plain‖ / ‖Δw_plain‖ after the steps


@dataclass
class Settings:
    """What every part reads: the device, the sizes (real or `--tiny`) and the measured matmul rate."""

    cuda: bool
    tiny: bool
    out: Path
    work: Path = Path(tempfile.gettempdir()) / "gpu_check_work"
    peak_tflops: float | None = None
    sizes: dict = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cuda else torch.float32


def sizes(tiny: bool) -> dict:
    if tiny:
        return dict(
            speed_shape=TINY,
            check_shape=TINY,
            max_length=128,
            batch=2,
            steps=1,
            warmup=1,
            ref_pairs=8,
            liger_length=64,
            qlora_shape=TINY,
            engine_shape=TINY,
        )
    return dict(
        speed_shape=QWEN_05B,
        check_shape=SMALL,
        max_length=2048,
        batch=8,
        steps=6,
        warmup=3,
        ref_pairs=128,
        liger_length=1024,
        qlora_shape=QWEN_05B,
        engine_shape=SMALL,
    )


# ---- shared pieces ---------------------------------------------------------------------------------------


def tokenizer():
    """A two-token word-level tokenizer: the pairs are token ids already, so it only gives the pad token."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1}, "<pad>")),
        pad_token="<pad>",
        eos_token="<eos>",
    )


def qwen2(shape: dict, attn: str, dtype: torch.dtype, device: str, seed: int = 0, **config):
    """A randomly initialised Qwen2 causal LM of `shape`, built on `device` (the same weights for the same seed)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**shape, **config, attn_implementation=attn))
    return model.to(dtype)


def pairs(n: int, max_length: int, vocab: int, seed: int = 0, fixed: bool = False) -> list[dict]:
    """Random-token pairs with HH-RLHF's shape: the prompt 55-80% of `max_length`, each completion 40-100% of the
    rest (prompt ≈ 70% of a sequence, as HH-RLHF's 1.55x prefix-sharing saving implies); `fixed`: every pair at
    the longest. The reference log-probs are set (-2 per token), as a precomputed reference gives them."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p = int(max_length * (0.7 if fixed else rng.uniform(0.55, 0.8)))
        c, r = (
            ((max_length - p) // 2,) * 2
            if fixed
            else (max(1, int((max_length - p) * rng.uniform(0.4, 1.0))) for _ in range(2))
        )
        rows.append(
            {
                "row_id": str(i),
                "prompt_ids": [rng.randrange(3, vocab) for _ in range(p)],
                "chosen_ids": [rng.randrange(3, vocab) for _ in range(c)],
                "rejected_ids": [rng.randrange(3, vocab) for _ in range(r)],
                "ref_chosen_logps": -2.0 * c,
                "ref_rejected_logps": -2.0 * r,
            }
        )
    return rows


def without_reference(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("ref_")} for row in rows]


def dpo_config(s: Settings, out: str, **options):
    from pipeline import DPOConfig

    base = dict(
        output_dir=out,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        bf16=s.cuda,
        use_cpu=not s.cuda,
        learning_rate=1e-6,
        seed=0,
    )
    return DPOConfig(**{**base, **options})


def trainer_for(s: Settings, model, rows: list[dict], out: str, ref_model=None, peft_config=None, **options):
    import datasets

    from pipeline import DPOTrainer

    return DPOTrainer(
        model,
        ref_model=ref_model,
        args=dpo_config(s, out, **options),
        peft_config=peft_config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer(),
    )


def loss_and_grads(trainer, rows: list[dict]) -> tuple[float, torch.Tensor]:
    """The objective of one batch of all `rows` in the trainer's layout, and the flattened gradients (float32, CPU,
    in parameter order)."""
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    dataset = trainer.train_dataset
    batch = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = [
        p.grad.float().flatten().cpu() if p.grad is not None else torch.zeros(p.numel())
        for p in model.parameters()
        if p.requires_grad
    ]
    return float(loss), torch.cat(grads)


def compare_grads(got: torch.Tensor, want: torch.Tensor) -> dict:
    diff = got - want
    return {
        "max_abs_diff": float(diff.abs().max()),
        "max_abs": float(want.abs().max()),
        "rel_l2": float(diff.norm() / want.norm().clamp(min=1e-30)),
        "cosine": float(torch.nn.functional.cosine_similarity(got.double(), want.double(), dim=0)),
    }


def fresh_accelerate_state() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


class StepClock:
    """A TrainerCallback's hooks timing each optimizer step (synchronised on CUDA); `times[i]` is step i's seconds."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self
        self.times: list[float] = []

        class Callback(TrainerCallback):
            def on_step_begin(self, *args, **kwargs):
                clock.sync()
                clock.times.append(-time.perf_counter())

            def on_step_end(self, *args, **kwargs):
                clock.sync()
                clock.times[-1] += time.perf_counter()

        self.callback = Callback()

    @staticmethod
    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def logged_losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ---- model FLOPs -----------------------------------------------------------------------------------------


def work(rows: list[dict], prefix_shared: bool) -> dict:
    """What the model computes for `rows` without padding: tokens through the body, attended (query, key) pairs
    (causal, a completion seeing the prompt and itself), and completion positions through the output layer."""
    tokens = attended = completions = 0
    for row in rows:
        p, c, r = len(row["prompt_ids"]), len(row["chosen_ids"]), len(row["rejected_ids"])
        completions += c + r
        tri = lambda n: n * (n + 1) // 2  # noqa: E731
        if prefix_shared:
            tokens += p + c + r
            attended += tri(p) + c * p + tri(c) + r * p + tri(r)
        else:
            tokens += 2 * p + c + r
            attended += tri(p + c) + tri(p + r)
    return {
        "tokens": tokens,
        "attended": attended,
        "completions": completions,
        "pair_tokens": sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows),
    }


def model_flops(shape: dict, model, w: dict, training: bool) -> float:
    """FLOPs of the work `w` (non-embedding matmuls 2·N per token, attention 4·hidden per attended pair per layer,
    the output layer 2·V·H per completion position), tripled for a training step (forward + backward; the
    recomputation of gradient checkpointing is not counted, as MFU conventionally does not)."""
    embedding = shape["vocab_size"] * shape["hidden_size"]
    body = sum(p.numel() for p in model.parameters()) - embedding * (1 if shape["tie_word_embeddings"] else 2)
    forward = (
        2 * body * w["tokens"]
        + 4 * shape["num_hidden_layers"] * shape["hidden_size"] * w["attended"]
        + 2 * embedding * w["completions"]
    )
    return forward * (3 if training else 1)


# ---- the parts ---------------------------------------------------------------------------------------------


def part_env(s: Settings) -> dict:
    import importlib.metadata as md

    versions = {}
    for name in (
        "torch",
        "transformers",
        "accelerate",
        "peft",
        "datasets",
        "liger-kernel",
        "bitsandbytes",
        "deepspeed",
        "triton",
    ):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    n, dtype = (8192, torch.bfloat16) if s.cuda else (512, torch.float32)
    a = torch.randn(n, n, device=s.device, dtype=dtype)
    b = torch.randn(n, n, device=s.device, dtype=dtype)
    for _ in range(3):
        a @ b
    StepClock.sync()
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    StepClock.sync()
    tflops = 2 * n**3 * reps / (time.perf_counter() - start) / 1e12
    return {
        "ok": True,
        "device": torch.cuda.get_device_name() if s.cuda else "CPU",
        "python": sys.version.split()[0],
        "cuda": torch.version.cuda,
        "versions": versions,
        "matmul_tflops": tflops,
        "matmul": f"{n}x{n}x{n} {str(dtype).replace('torch.', '')}, mean of {reps} after 3 warm-ups",
    }


def part_fp32_cuda_vs_cpu(s: Settings) -> dict:
    if not s.cuda:
        return {"skipped": "needs CUDA (the rehearsal compares the CPU with itself)", **_fp32_compare(s, "cpu")}
    return _fp32_compare(s, "cuda")


def _fp32_compare(s: Settings, device: str) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    shape = s.sizes["check_shape"]
    rows = without_reference(pairs(8, 256 if not s.tiny else 64, shape["vocab_size"], seed=1))
    cpu_model = qwen2(shape, "sdpa", torch.float32, "cpu")
    results = {}
    for where in ("cpu", device):
        model = cpu_model if where == "cpu" else qwen2(shape, "sdpa", torch.float32, "cpu").to(where)
        fresh_accelerate_state()  # the CPU trainer's use_cpu must not stick to the CUDA one (a process-wide singleton)
        with tempfile.TemporaryDirectory() as out:
            trainer = trainer_for(
                Settings(where == "cuda", s.tiny, s.out),
                model,
                rows,
                out,
                bf16=False,
                precompute_ref_log_probs=True,
                per_device_train_batch_size=len(rows),
            )
            ran_on = next(trainer.model.parameters()).device.type
            if ran_on != where:
                raise RuntimeError(f"the {where} trainer ran on {ran_on}")
            loss, grads = loss_and_grads(trainer, rows)
            ref = [trainer.train_dataset[i]["ref_chosen_logps"] for i in range(len(rows))]
            results[where] = (loss, grads, torch.tensor(ref, dtype=torch.float64), trainer.layout)
    (cpu_loss, cpu_grads, cpu_ref, layout), (loss, grads, ref, _) = results["cpu"], results[device]
    grad = compare_grads(grads, cpu_grads)
    loss_diff = abs(loss - cpu_loss)
    ref_diff = float((ref - cpu_ref).abs().max())
    return {
        "ok": loss_diff <= FP32_TOL
        and grad["max_abs_diff"] <= FP32_TOL * max(1.0, grad["max_abs"])
        and ref_diff <= FP32_TOL * max(1.0, float(cpu_ref.abs().max())),
        "layout": layout,
        "loss_cpu": cpu_loss,
        "loss": loss,
        "loss_abs_diff": loss_diff,
        "ref_logps_max_abs_diff": ref_diff,
        "grads": grad,
        "tolerance": FP32_TOL,
    }


def expected_layout(attn: str, cuda: bool) -> str:
    """What docs/speed-and-memory.md says the probe picks: prefix-shared for every implementation that takes a custom mask, except
    FlexAttention on the CPU, whose block mask the CPU build does not honour (it falls back to packed)."""
    return "packed" if attn == "flex_attention" and not cuda else "prefix_shared"


NO_FLEX_ON_CPU = "FlexAttention has no backward pass on the CPU (and its compile is slow there): CUDA only"


def layout_name(layout) -> str:
    """The kind of a `pipeline.model.batch_layout.BatchLayout`."""
    return layout.kind


def part_bf16_layouts(s: Settings) -> dict:
    from pipeline.model.batch_layout import BatchLayout
    from pipeline.model.layout import batch_layout

    shape = s.sizes["check_shape"]
    rows = pairs(8, 512 if not s.tiny else 64, shape["vocab_size"], seed=2)
    weights = qwen2(shape, "sdpa", s.dtype, s.device).state_dict()
    out: dict = {"dtype": str(s.dtype).replace("torch.", ""), "layouts": {}}
    for name, (attn, options) in LAYOUTS.items():
        if attn == "flex_attention" and not s.cuda:
            out["layouts"][name] = {"skipped": NO_FLEX_ON_CPU}
            continue
        model = qwen2(shape, attn, s.dtype, s.device)
        model.load_state_dict(weights)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = trainer_for(
                s, model, rows, tmp, precompute_ref_log_probs=True, per_device_train_batch_size=len(rows), **options
            )
            loss, grads = loss_and_grads(trainer, rows)
        wanted = BatchLayout.of_options(options.get("prefix_sharing", False), options.get("packing", False)).kind
        out["layouts"][name] = {"loss": loss, "took": layout_name(trainer.layout), "wanted": wanted, "grads": grads}
        del trainer, model
        release()
    padded = out["layouts"]["padded"]
    ok = True
    for name, r in out["layouts"].items():
        if "skipped" in r:
            continue
        r["loss_abs_diff"] = abs(r["loss"] - padded["loss"])
        r.update({k: v for k, v in compare_grads(r.pop("grads"), padded["grads"]).items()} if name != "padded" else {})
        r["ok"] = r["took"] == r["wanted"] and (
            name == "padded"
            or (
                r["loss_abs_diff"] <= BF16_LOSS_TOL * max(1.0, abs(padded["loss"]))
                and r["cosine"] >= BF16_GRAD_COS
                and r["rel_l2"] <= BF16_GRAD_REL
            )
        )
        ok &= r["ok"]
    padded.pop("grads", None)
    # the probe on its own: implementations that take a custom mask, and a sliding-window model
    probe = {}
    for attn in ("sdpa", "eager", "flex_attention") if s.cuda else ("sdpa", "eager"):
        model = qwen2(shape, attn, s.dtype, s.device)
        probe[attn] = {
            "took": layout_name(batch_layout([model], BatchLayout.of_options(True, True))),
            "wanted": expected_layout(attn, s.cuda),
        }
    # a model given on the CPU (as loading by path leaves it) is probed where the Trainer places it
    attn = "flex_attention" if s.cuda else "sdpa"
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_for(s, qwen2(shape, attn, s.dtype, "cpu"), rows, tmp, precompute_ref_log_probs=True)
        probe[f"{attn}, model given on the CPU"] = {"took": layout_name(trainer.layout), "wanted": "prefix_shared"}
    window = qwen2(shape, "sdpa", s.dtype, s.device, use_sliding_window=True, sliding_window=16, max_window_layers=0)
    probe["sdpa, sliding window"] = {
        "took": layout_name(batch_layout([window], BatchLayout.of_options(True, True))),
        "wanted": "packed",
    }
    out["probe"] = probe
    out["ok"] = ok and all(p["took"] == p["wanted"] for p in probe.values())
    out["tolerance"] = {"loss": BF16_LOSS_TOL, "grad_cosine": BF16_GRAD_COS, "grad_rel_l2": BF16_GRAD_REL}
    return out


def part_speed(s: Settings) -> dict:
    z = s.sizes
    shape = z["speed_shape"]
    rows = pairs((z["warmup"] + z["steps"]) * z["batch"], z["max_length"], shape["vocab_size"], seed=3)
    timed = rows[z["warmup"] * z["batch"] :]
    out: dict = {
        "shape": "Qwen2.5-0.5B" if shape is QWEN_05B else "tiny",
        "batch_pairs": z["batch"],
        "max_length": z["max_length"],
        "steps": z["steps"],
        "warmup": z["warmup"],
        "gradient_checkpointing": True,
        "layouts": {},
    }
    for name, (attn, options) in LAYOUTS.items():
        if attn == "flex_attention" and not s.cuda:
            out["layouts"][name] = {"skipped": NO_FLEX_ON_CPU}
            continue
        try:
            out["layouts"][name] = _layout_speed(s, shape, attn, options, rows, timed)
        except Exception as err:  # noqa: BLE001 - one layout's failure is reported, the others still run
            out["layouts"][name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
        release()
    out["reference_pass"] = _reference_speed(s, shape)
    padded, flex = out["layouts"].get("padded", {}), out["layouts"].get("prefix-shared flex", {})
    if padded.get("tokens_per_s") and flex.get("tokens_per_s"):
        out["flex_over_padded"] = flex["tokens_per_s"] / padded["tokens_per_s"]
    out["ok"] = (
        all(r.get("ok") or "skipped" in r for r in out["layouts"].values())
        and out["reference_pass"].get("ok", False)
        and (not s.cuda or out.get("flex_over_padded", 0) >= 1.3)
    )
    return out


def _layout_speed(s: Settings, shape: dict, attn: str, options: dict, rows: list[dict], timed: list[dict]) -> dict:
    z = s.sizes
    model = qwen2(shape, attn, s.dtype, s.device)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_for(
            s,
            model,
            rows,
            tmp,
            precompute_ref_log_probs=True,
            max_steps=z["warmup"] + z["steps"],
            per_device_train_batch_size=z["batch"],
            **options,
        )
        took = layout_name(trainer.layout)
        trainer.add_callback(clock.callback)
        release()
        trainer.train()
    seconds = sum(clock.times[z["warmup"] :])
    w = work(timed, options["prefix_sharing"] and took == "prefix_shared")
    batches = [timed[i : i + z["batch"]] for i in range(0, len(timed), z["batch"])]
    run_tokens = sum(int(trainer.data_collator(b)["input_ids"].numel()) for b in batches)
    flops = model_flops(shape, model, w, training=True)
    return {
        "ok": math.isfinite(logged_losses(trainer)[-1]),
        "took": took,
        "tokens_per_s": w["pair_tokens"] / seconds,
        "seconds_per_step": seconds / z["steps"],
        "model_tokens": run_tokens,
        "real_tokens": w["tokens"],
        "tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / (s.peak_tflops * 1e12) if s.peak_tflops else None,
        "peak_gb": peak_gb(),
    }


def _reference_speed(s: Settings, shape: dict) -> dict:
    """The reference pass as `dpo ref-logps` runs it (`add_reference_logps`: blocks of pairs in length-sorted batches
    of at most 16,384 tokens, prefix-shared and packed, the chunked head), in pairs/s."""
    import datasets

    from pipeline.model.collator import DataCollatorForPreference
    from pipeline.objective.reference import Reference
    from pipeline.run.reference_pass import add_reference_logps

    z = s.sizes
    rows = without_reference(pairs(z["ref_pairs"], z["max_length"], shape["vocab_size"], seed=4))
    model = qwen2(shape, "sdpa", s.dtype, s.device).eval()
    collator = DataCollatorForPreference(0, prefix_sharing=True, packing=True)
    reference = Reference("policy", model, "base")
    dataset = datasets.Dataset.from_list(rows)
    add_reference_logps(dataset.select(range(min(8, len(rows)))), reference, collator, 64)  # warm-up
    StepClock.sync()
    start = time.perf_counter()
    scored = add_reference_logps(dataset, reference, collator, 64)
    StepClock.sync()
    seconds = time.perf_counter() - start
    w = work(rows, prefix_shared=True)
    flops = model_flops(shape, model, w, training=False)
    finite = all(math.isfinite(v) for v in scored["ref_chosen_logps"])
    return {
        "ok": finite,
        "pairs": len(rows),
        "pairs_per_s": len(rows) / seconds,
        "tokens_per_s": w["pair_tokens"] / seconds,
        "tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / (s.peak_tflops * 1e12) if s.peak_tflops else None,
        "peak_gb": peak_gb(),
    }


def part_liger(s: Settings) -> dict:
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        return {"ok": False, "error": "liger-kernel is not installed (carry its wheel: benchmarks/gpu_wheels.sh)"}
    z = s.sizes
    shape = z["speed_shape"]
    batch, steps, warmup = (4, 4, 2) if s.cuda else (2, 1, 1)
    rows = without_reference(
        pairs(batch * (steps + warmup), z["liger_length"], shape["vocab_size"], seed=5, fixed=True)
    )
    policy = qwen2(shape, "sdpa", s.dtype, s.device)
    weights = {k: v.clone() for k, v in policy.state_dict().items()}
    torch.manual_seed(1)
    ref_weights = {
        k: v + 0.02 * v.float().std() * torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
        for k, v in weights.items()
    }  # a reference near, not equal to, the policy: a loss other than ln 2
    out: dict = {"batch_pairs": batch, "length": z["liger_length"], "routes": {}}
    for route, liger in (("ours (chunked head)", False), ("liger", True)):
        model = qwen2(shape, "sdpa", s.dtype, s.device)
        model.load_state_dict(weights)
        ref = qwen2(shape, "sdpa", s.dtype, s.device)
        ref.load_state_dict(ref_weights)
        clock = StepClock()
        with tempfile.TemporaryDirectory() as tmp:
            trainer = trainer_for(
                s,
                model,
                rows,
                tmp,
                ref_model=ref,
                precompute_ref_log_probs=False,
                use_liger_kernel=liger,
                max_steps=steps + warmup,
                per_device_train_batch_size=batch,
            )
            loss, grads = loss_and_grads(trainer, rows[:batch])
            model.zero_grad(set_to_none=True)
            trainer.add_callback(clock.callback)
            release()
            trainer.train()
        seconds = sum(clock.times[warmup:])
        out["routes"][route] = {
            "loss": loss,
            "grads": grads,
            "peak_gb": peak_gb(),
            "pairs_per_s": batch * steps / seconds,
            "seconds_per_step": seconds / steps,
            "losses": logged_losses(trainer),
        }
        del trainer, model, ref
        release()
    ours, fused = out["routes"]["ours (chunked head)"], out["routes"]["liger"]
    grad = compare_grads(fused.pop("grads"), ours.pop("grads"))
    out.update(
        loss_abs_diff=abs(fused["loss"] - ours["loss"]),
        grads=grad,
        compiled=s.cuda,
        speed_ratio=fused["pairs_per_s"] / ours["pairs_per_s"],
    )
    out["ok"] = (
        out["loss_abs_diff"] <= BF16_LOSS_TOL * max(1.0, abs(ours["loss"]))
        and grad["cosine"] >= BF16_GRAD_COS
        and all(math.isfinite(v) for v in fused["losses"])
    )
    return out


def part_qlora(s: Settings) -> dict:
    from peft import LoraConfig

    from pipeline.model.loading import is_quantized, load_causal_lm

    shape = s.sizes["qlora_shape"]
    quantize = s.cuda
    rows = pairs(8, 512 if s.cuda else 64, shape["vocab_size"], seed=6)
    with tempfile.TemporaryDirectory() as tmp:
        qwen2(shape, "sdpa", torch.bfloat16, s.device).save_pretrained(f"{tmp}/base")
        tokenizer().save_pretrained(f"{tmp}/base")
        release()
        kwargs = {"dtype": "bfloat16" if s.cuda else "float32"}
        if quantize:
            kwargs["quantization_config"] = {
                "load_in_4bit": True,
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_compute_dtype": "bfloat16",
                "bnb_4bit_use_double_quant": True,
            }
        model = load_causal_lm(f"{tmp}/base", kwargs)
        footprint = model.get_memory_footprint() / 2**30
        lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = trainer_for(
            s,
            model,
            without_reference(rows),
            f"{tmp}/out",
            peft_config=lora,
            precompute_ref_log_probs=True,
            max_steps=5,
            per_device_train_batch_size=8,
            learning_rate=5e-4,
            lr_scheduler_type="constant",
        )
        release()
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    losses = logged_losses(trainer)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    out = {
        "quantized": is_quantized(trainer.model),
        "losses": losses,
        "trainable_params": trainable,
        "weights_gb": footprint,
        "peak_gb": peak_gb(),
        "seconds": seconds,
        "ok": all(math.isfinite(v) for v in losses)
        and losses[-1] < losses[0]
        and is_quantized(trainer.model) == quantize,
    }
    if not quantize:
        out["skipped"] = "4-bit needs CUDA and bitsandbytes: the rehearsal trains LoRA on the unquantized base"
    return out


# ---- FSDP and DeepSpeed: `accelerate launch` with the shipped configs, against plain training --------------

ENGINE_STEPS = 3
ENGINE_TIMEOUT_S = 100  # one engine run (a launch, a model of a few million parameters, 3 steps)


def engine_spec(s: Settings, folder: Path) -> None:
    """The model (saved: loaded by path, as a user's run loads it) and the pairs every engine run trains on."""
    shape = s.sizes["engine_shape"]
    qwen2(shape, "sdpa", torch.float32, "cpu").save_pretrained(folder / "base")
    tokenizer().save_pretrained(folder / "base")
    rows = without_reference(pairs(8, 256 if not s.tiny else 64, shape["vocab_size"], seed=7))
    (folder / "rows.json").write_text(json.dumps(rows))


def engine_worker(spec: dict) -> None:
    """One engine run (plain, or inside `accelerate launch`): ENGINE_STEPS SGD steps of all the pairs, then the
    per-step losses, the time and the peak memory to `spec["result"]`, the weights to `spec["weights"]`."""
    import faulthandler

    import datasets

    from pipeline import DPOConfig, DPOTrainer

    faulthandler.dump_traceback_later(ENGINE_TIMEOUT_S - 15)  # a hang shows where it hangs, in the part's error
    rows = json.loads(Path(spec["rows"]).read_text())
    args = DPOConfig(
        output_dir=spec["output"],
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        bf16=spec["cuda"],
        use_cpu=not spec["cuda"],
        max_steps=ENGINE_STEPS,
        per_device_train_batch_size=len(rows),
        optim="sgd",
        learning_rate=spec.get("lr", 0.2),
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        seed=0,
        precompute_ref_log_probs=spec.get("precompute", True),
    )
    trainer = DPOTrainer(spec["model"], args=args, train_dataset=datasets.Dataset.from_list(rows))
    print(f"engine worker: trainer built, layout {trainer.layout}, reference {trainer.reference.kind}", file=sys.stderr)
    release()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(spec["weights"])
    if trainer.accelerator.is_main_process:
        engine = "deepspeed" if trainer.is_deepspeed_enabled else "fsdp" if trainer.is_fsdp_enabled else "plain"
        reference = trainer.reference.kind
        Path(spec["result"]).write_text(
            json.dumps(
                {
                    "losses": logged_losses(trainer),
                    "seconds": seconds,
                    "peak_gb": peak_gb(),
                    "engine": engine,
                    "reference": reference,
                }
            )
        )


def run_engine(spec: dict, config: str | None, tmp: Path, name: str, timeout: float) -> dict:
    spec = {
        **spec,
        "output": str(tmp / f"{name}-out"),
        "weights": str(tmp / f"{name}-weights"),
        "result": str(tmp / f"{name}.json"),
    }
    worker = [str(Path(__file__).resolve()), "--engine-worker", json.dumps(spec)]
    if config is None:
        command = [sys.executable, *worker]
    else:
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *(["--config_file", str(ROOT / config)] if config != "cpu" else ["--cpu"]),
            "--num_processes",
            "1",
            "--main_process_port",
            str(29500 + random.randrange(1000)),
            *worker,
        ]
    code, output = run_group(command, timeout)
    if code != 0 or not Path(spec["result"]).is_file():
        raise RuntimeError(f"{name} exited {code}: {output[-3000:]}")
    return {**json.loads(Path(spec["result"]).read_text()), "weights": spec["weights"]}


def load_weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        weights.update({k: v.float() for k, v in load_file(f).items()})
    return weights


def compare_engine(run: dict, plain: dict, initial: dict[str, torch.Tensor]) -> dict:
    """Per-step losses and the weights' updates of an engine run against plain training."""
    got, want = load_weights(run["weights"]), load_weights(plain["weights"])
    names = sorted(set(got) & set(want) & set(initial))
    if not names:
        raise RuntimeError(f"no common weights to compare ({sorted(got)[:3]} vs {sorted(want)[:3]})")
    d_got = torch.cat([(got[k] - initial[k]).flatten() for k in names])
    d_want = torch.cat([(want[k] - initial[k]).flatten() for k in names])
    losses = [abs(a - b) for a, b in zip(run["losses"], plain["losses"], strict=True)]
    update = float((d_got - d_want).norm() / d_want.norm().clamp(min=1e-30))
    return {
        "losses": run["losses"],
        "plain_losses": plain["losses"],
        "loss_max_abs_diff": max(losses),
        "update_rel_l2": update,
        "update_norm": float(d_want.norm()),
        "weights_compared": len(names),
        "engine": run["engine"],
        "reference": run["reference"],
        "train_seconds": run["seconds"],
        "peak_gb": run["peak_gb"],
        "ok": max(losses) <= BF16_LOSS_TOL * max(1.0, max(abs(v) for v in plain["losses"]))
        and update <= ENGINE_UPDATE_REL
        and math.isfinite(update),
    }


def part_engine(s: Settings, name: str) -> dict:
    import importlib.util

    if not s.cuda and name != "fsdp":
        return {"skipped": f"{name} needs CUDA GPUs and DeepSpeed (the fsdp part rehearses the launch on the CPU)"}
    if s.cuda and name.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        return {"ok": False, "error": "deepspeed is not installed (carry its wheel: benchmarks/gpu_wheels.sh)"}
    config = ENGINE_CONFIGS[name] if s.cuda else "cpu"
    work_dir = s.work / "engines"  # the model, the pairs and the plain runs, shared by the engine parts
    if not (work_dir / "rows.json").is_file():
        work_dir.mkdir(parents=True, exist_ok=True)
        engine_spec(s, work_dir)
    spec = {"model": str(work_dir / "base"), "rows": str(work_dir / "rows.json"), "cuda": s.cuda}
    initial = load_weights(spec["model"])

    def plain(variant: str, spec: dict) -> dict:  # plain single-device training, run once for every engine part
        if not (work_dir / f"{variant}.json").is_file():
            return run_engine(spec, None, work_dir, variant, timeout=ENGINE_TIMEOUT_S)
        return {
            **json.loads((work_dir / f"{variant}.json").read_text()),
            "weights": str(work_dir / f"{variant}-weights"),
        }

    with tempfile.TemporaryDirectory() as tmp:
        out = compare_engine(
            run_engine(spec, config, Path(tmp), name, timeout=ENGINE_TIMEOUT_S), plain("plain", spec), initial
        )
        out["config"] = config if s.cuda else "accelerate launch --cpu"
        if name == "fsdp":  # the online reference: a frozen copy of the initial policy, prepared by FSDP
            online = {**spec, "precompute": False}
            try:  # reported on its own: a failure here keeps the precomputed run's figures
                ref = compare_engine(
                    run_engine(online, config, Path(tmp), f"{name}-online", timeout=ENGINE_TIMEOUT_S),
                    plain("plain-online", online),
                    initial,
                )
                ref["ok"] = ref["ok"] and ref["reference"] == "initial_copy"
            except Exception as err:  # noqa: BLE001
                ref = {"ok": False, "error": f"{type(err).__name__}: {err}"[:3000]}
            out["online_reference"] = ref
            out["ok"] = out["ok"] and ref["ok"]
    if not s.cuda:
        out["skipped"] = "FSDP needs CUDA GPUs: the rehearsal runs the same launch with `accelerate launch --cpu`"
    return out


# ---- running the parts, the report ----------------------------------------------------------------------------


def run_part(name: str, s: Settings) -> dict:
    start = time.perf_counter()
    try:
        if name in ENGINE_CONFIGS:
            result = part_engine(s, name)
        else:
            result = globals()[f"part_{name}"](s)
    except Exception as err:  # noqa: BLE001 - a failing part reports its error; the others still run
        result = {
            "ok": False,
            "error": f"{type(err).__name__}: {err}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def run_isolated(name: str, s: Settings, timeout: float) -> dict:
    """`name` in a fresh process (a crash, a hung kernel or a poisoned CUDA context stays there)."""
    result_file = s.out / f".{name}.json"
    result_file.unlink(missing_ok=True)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--part-worker",
        name,
        "--out",
        str(s.out),
        *(["--tiny"] if s.tiny else []),
        *(["--peak-tflops", str(s.peak_tflops)] if s.peak_tflops else []),
    ]
    start = time.perf_counter()
    code, output = run_group(command, timeout)
    if not result_file.is_file():
        why = f"timed out after {timeout:.0f} s" if code is None else f"its process exited {code} without a result"
        return {"ok": False, "error": why, "output": output[-4000:], "seconds": round(time.perf_counter() - start, 1)}
    result = json.loads(result_file.read_text())
    result_file.unlink()
    return result


def run_group(command: list[str], timeout: float) -> tuple[int | None, str]:
    """Run `command` in a process group of its own; past `timeout` the whole group is killed (a launcher's workers
    too, so nothing is left holding the GPU). Returns (exit code, None when killed; stdout and stderr)."""
    import signal

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return None, output


def status(result: dict) -> str:
    if result.get("skipped") and result.get("ok", True):
        return "rehearsed" if "ok" in result else "skipped"
    return "pass" if result.get("ok") else "FAIL"


def markdown(report: dict) -> str:
    env = report["parts"].get("env", {})
    v = env.get("versions", {})
    lines = [
        f"# GPU check: {env.get('device', '?')}",
        "",
        f"{report['date']}; Python {env.get('python')}, CUDA {env.get('cuda')}, "
        + ", ".join(f"{k} {val}" for k, val in v.items() if val)
        + ".",
        f"Measured dense matmul: {env.get('matmul_tflops', 0):.3g} TFLOP/s ({env.get('matmul', '')}). "
        f"Total {report['seconds']:.0f} s.",
        "",
        "| part | result | seconds | note |",
        "|---|---|---:|---|",
    ]
    for name, r in report["parts"].items():
        note = r.get("error") or r.get("skipped") or ""
        lines.append(f"| {name} | {status(r)} | {r.get('seconds', '')} | {str(note)[:160].replace('|', '/')} |")
    speed = report["parts"].get("speed", {})
    if speed.get("layouts"):
        lines += [
            "",
            f"Speed ({speed['shape']}-shaped, bf16, gradient checkpointing, batch {speed['batch_pairs']} pairs, "
            f"pairs up to {speed['max_length']} tokens, {speed['steps']} timed steps after {speed['warmup']}):",
            "",
            "| layout | took | tokens/s | model tokens | TFLOP/s | MFU | peak GiB |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for name, r in speed["layouts"].items():
            if "tokens_per_s" not in r:
                why = f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r.get('error', '')[:120]}"
                lines.append(f"| {name} | {why} | | | | | |")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            peak = f"{r['peak_gb']:.1f}" if r.get("peak_gb") is not None else "-"
            lines.append(
                f"| {name} | {r['took']} | {r['tokens_per_s']:,.0f} | {r['model_tokens']:,} | {r['tflops']:.3g} "
                f"| {mfu} | {peak} |"
            )
        if "flex_over_padded" in speed:
            lines.append(f"\nPrefix-shared Flex over padded: **{speed['flex_over_padded']:.2f}x** tokens/s.")
        ref = speed.get("reference_pass", {})
        if "pairs_per_s" in ref:
            mfu = f", MFU {100 * ref['mfu']:.1f}%" if ref.get("mfu") is not None else ""
            lines.append(
                f"Reference pass: {ref['pairs_per_s']:.1f} pairs/s ({ref['tokens_per_s']:,.0f} tokens/s{mfu}) "
                f"over {ref['pairs']} pairs."
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the CPU rehearsal: tiny shapes, CUDA-only parts skipped")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "results" / "gpu_check"))
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=420.0,
        help="start no part after this many seconds; a part's process is stopped a minute after it",
    )
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each part in a process of its own (default: on CUDA)",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (default: env's measurement)")
    parser.add_argument("--part-worker", help=argparse.SUPPRESS)
    parser.add_argument("--engine-worker", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.engine_worker:
        return engine_worker(json.loads(cli.engine_worker))
    cuda = torch.cuda.is_available() and not cli.tiny
    s = Settings(cuda=cuda, tiny=cli.tiny, out=cli.out, peak_tflops=cli.peak_tflops, sizes=sizes(cli.tiny))
    s.out.mkdir(parents=True, exist_ok=True)
    if cli.part_worker:
        (s.out / f".{cli.part_worker}.json").write_text(json.dumps(run_part(cli.part_worker, s), default=str))
        return
    isolate = cuda if cli.isolate is None else cli.isolate
    shutil.rmtree(s.work, ignore_errors=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tiny": cli.tiny, "parts": {}}
    start = time.perf_counter()
    for name in cli.parts:
        elapsed = time.perf_counter() - start
        if elapsed > cli.deadline_s:
            report["parts"][name] = {
                "ok": False,
                "error": f"not started: {elapsed:.0f} s past, deadline {cli.deadline_s:.0f} s",
            }
            continue
        print(f"[{elapsed:6.1f} s] {name} ...", flush=True)
        timeout = min(BUDGET_S[name], max(30.0, cli.deadline_s + 60 - elapsed))
        result = run_isolated(name, s, timeout) if isolate else run_part(name, s)
        report["parts"][name] = result
        if name == "env" and result.get("matmul_tflops") and s.peak_tflops is None:
            s.peak_tflops = result["matmul_tflops"]
        print(
            f"[{time.perf_counter() - start:6.1f} s] {name}: {status(result)}"
            + (f" ({result['error'][:300]})" if result.get("error") else ""),
            flush=True,
        )
        (s.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    report["seconds"] = time.perf_counter() - start
    shutil.rmtree(s.work, ignore_errors=True)
    (s.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (s.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    failed = [n for n, r in report["parts"].items() if status(r) == "FAIL"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
