"""What a model is given to keep the sequences of a packed or prefix-shared batch apart, and which batch layout a
model can take.

A prefix-shared batch (`pipeline.collator`) needs a mask the model's attention honours as given: token q sees
token k of the same row iff both belong to the same segment (pair), k is not after q, and k is a prompt token or
of q's own part (a completion never sees the other completion). It is built here for the model's attention
implementation: a boolean `[rows, 1, T, T]` mask for SDPA (the CPU default), an additive float one for eager
attention, a block-sparse `BlockMask` for FlexAttention (GPU). A packed batch needs no mask: `position_ids` that
restart at 0 are how transformers' attention implementations (SDPA, eager, flash, flex) tell sequences apart.

Whether a model really honours either is not assumed from its class: `layout_problem` runs a short probe (the
log-probs of a tiny batch in the candidate layout against the padded one, and the second completion's log-probs
unchanged when the first completion's tokens change) and says what is wrong, so the caller falls back.
"""

from __future__ import annotations

import logging
import weakref

import torch

from .collator import PROMPT, DataCollatorForPreference

logger = logging.getLogger(__name__)

MASKED_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")  # take a custom 4D mask (or BlockMask) as given


def allowed(segment_ids: torch.Tensor, part_ids: torch.Tensor) -> torch.Tensor:
    """`[rows, 1, T, T]` booleans: may query q see key k (the rule of the module docstring)? Every token sees itself,
    so no query row is empty (a padding position's attention stays finite)."""
    q_seg, k_seg = segment_ids.unsqueeze(-1), segment_ids.unsqueeze(-2)
    q_part, k_part = part_ids.unsqueeze(-1), part_ids.unsqueeze(-2)
    t = segment_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    visible = (q_seg == k_seg) & causal & ((k_part == PROMPT) | (k_part == q_part))
    return (visible | torch.eye(t, dtype=torch.bool, device=segment_ids.device)).unsqueeze(1)


def implementation(model: torch.nn.Module) -> str | None:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "_attn_implementation", None)


def prefix_shared_mask(model: torch.nn.Module, inputs: dict):
    """The attention mask of a prefix-shared batch in the form `model`'s attention implementation takes."""
    segment_ids, part_ids = inputs["segment_ids"], inputs["part_ids"]
    kind = implementation(model)
    if kind == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, k):
            same = segment_ids[b, q] == segment_ids[b, k]
            seen = (part_ids[b, k] == PROMPT) | (part_ids[b, k] == part_ids[b, q])
            return (same & (k <= q) & seen) | (q == k)
        rows, t = segment_ids.shape
        return create_block_mask(mask_mod, rows, None, t, t, device=segment_ids.device)
    mask = allowed(segment_ids, part_ids)
    if kind == "eager":
        dtype = next(model.parameters()).dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    return mask


# ---- which layout a model takes ---------------------------------------------------------------------------

_PROBE = [([1, 2, 3], [4, 5], [6, 7, 8]), ([1, 2], [9], [5, 6])]  # (prompt, chosen, rejected) token ids
_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → {layout: problem or None}


def _probe_pairs(vocab: int, changed: bool = False) -> list[dict]:
    pairs = []
    for prompt, chosen, rejected in _PROBE:
        chosen = [t + 3 for t in chosen] if changed else chosen  # other tokens in the first completion
        pairs.append({"prompt_ids": [t % vocab for t in prompt], "chosen_ids": [t % vocab for t in chosen],
                      "rejected_ids": [t % vocab for t in rejected]})
    return pairs


def layout_problem(model: torch.nn.Module, layout: str) -> str | None:
    """None if `model` computes the same log-probs from a `layout` ("packed" or "prefix_shared") batch as from a
    padded one, else why not (decided once per model). Checked: its attention implementation (a custom mask needs
    one that takes it), sliding-window attention (a custom mask would drop the window), then the probe."""
    known = _checked.setdefault(model, {})
    if layout not in known:
        known[layout] = _problem(model, layout)
    return known[layout]


def _problem(model: torch.nn.Module, layout: str) -> str | None:
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    kind = implementation(inner.get_base_model() if hasattr(inner, "get_base_model") else inner)
    if layout == "prefix_shared":
        if kind not in MASKED_IMPLEMENTATIONS:
            return f"its attention implementation {kind!r} takes no custom mask (sdpa, eager and flex_attention do)"
        config = getattr(inner, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(text, "sliding_window", None) and (getattr(text, "use_sliding_window", False)
                                                      or "sliding_attention" in (getattr(text, "layer_types", None) or [])):
            return "it uses sliding-window attention"
    try:
        return _probe(model, layout)
    except Exception as err:  # noqa: BLE001 - any failure of the probe means: do not use this layout
        return f"{type(err).__name__}: {err}"


@torch.no_grad()
def _probe(model: torch.nn.Module, layout: str) -> str | None:
    from .head import evaluating, token_values

    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = int(getattr(text, "vocab_size", 10) or 10)
    device = next(model.parameters()).device
    candidate = DataCollatorForPreference(0, prefix_sharing=layout == "prefix_shared", packing=True)
    padded = DataCollatorForPreference(0)

    def logps(collator, pairs):
        batch = {k: v.to(device) for k, v in collator(pairs).items()}
        mask = batch["completion_mask"][:, 1:].bool()
        return token_values(model, batch, mask).logps.float() * mask, mask

    with evaluating(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        want, mask = logps(padded, _probe_pairs(vocab))
        got, _ = logps(candidate, _probe_pairs(vocab))
        changed, _ = logps(candidate, _probe_pairs(vocab, changed=True))
    n = mask.shape[0] // 2
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if not torch.allclose(got, want, rtol=tol, atol=tol * max(1.0, float(want.abs().max()))):
        return f"its log-probs differ from the padded batch's by {float((got - want).abs().max()):.2e}"
    if not torch.allclose(changed[n:], got[n:], rtol=1e-5, atol=1e-5):
        return "a completion's log-probs change with the other completion's tokens (the mask is not honoured)"
    return None


def batch_layout(models: list[torch.nn.Module], prefix_sharing: bool, packing: bool, padding_free: bool) -> dict:
    """The collator options (`prefix_sharing`, `packing`, `padding_free`) that every model of `models` takes,
    falling back from prefix-shared to packed to padded with one log line each. `padding_free` is honoured as
    documented (one packed row) unless a model cannot take packed rows at all."""
    wanted = "prefix_shared" if prefix_sharing else "packed" if (packing or padding_free) else "padded"
    for layout in ("prefix_shared", "packed"):
        if wanted != layout:
            continue
        for model in models:
            problem = layout_problem(model, layout)
            if problem:
                fallback = "packed" if layout == "prefix_shared" and (packing or padding_free) else "padded"
                logger.warning("%s cannot take %s batches (%s); using %s batches", type(model).__name__,
                               layout.replace("_", "-"), problem, fallback)
                wanted = fallback
                break
    return {"prefix_sharing": wanted == "prefix_shared", "packing": wanted != "padded" and packing,
            "padding_free": wanted != "padded" and padding_free}
