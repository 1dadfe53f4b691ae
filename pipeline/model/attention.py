"""What a model is given to keep the sequences of a packed or prefix-shared batch apart.

A prefix-shared batch (`pipeline.model.collator`) needs a mask the model's attention honours as given: token q sees
token k of the same row iff both belong to the same segment (pair), k is not after q, and k is a prompt token or
of q's own part (a completion never sees the other completion). It is built here for the model's attention
implementation: a boolean `[rows, 1, T, T]` mask for SDPA (the CPU default), an additive float one for eager
attention, a block-sparse `BlockMask` for FlexAttention (GPU). A packed batch needs no mask: `position_ids` that
restart at 0 are how transformers' attention implementations (SDPA, eager, flash, flex) tell sequences apart.
Whether a model really honours either is probed, not assumed (`pipeline.model.layout`).
"""

from __future__ import annotations

import torch

from pipeline.model.collator import PROMPT

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
