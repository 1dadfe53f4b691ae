"""Which batch layout a model can take: padded, packed, or prefix-shared.

Whether a model really honours a packed or prefix-shared batch is not assumed from its class: `layout_problem`
runs a short probe (the log-probs of a tiny batch in the candidate layout against the padded one, and the second
completion's log-probs unchanged when the first completion's tokens change) and says what is wrong, so the caller
falls back.
"""

from __future__ import annotations

import logging
import weakref

import torch

from pipeline.model.attention import MASKED_IMPLEMENTATIONS, implementation
from pipeline.model.batch_layout import PACKED, PREFIX_SHARED, BatchLayout
from pipeline.model.collator import DataCollatorForPreference
from pipeline.model.head import evaluating, token_values

logger = logging.getLogger(__name__)

_PROBE = [([1, 2, 3], [4, 5], [6, 7, 8]), ([1, 2], [9], [5, 6])]  # (prompt, chosen, rejected) token ids
_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → {layout: problem or None}


def _probe_pairs(vocab: int, changed: bool = False) -> list[dict]:
    pairs = []
    for prompt, chosen, rejected in _PROBE:
        chosen = [t + 3 for t in chosen] if changed else chosen  # other tokens in the first completion
        pairs.append(
            {
                "prompt_ids": [t % vocab for t in prompt],
                "chosen_ids": [t % vocab for t in chosen],
                "rejected_ids": [t % vocab for t in rejected],
            }
        )
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
        if getattr(text, "sliding_window", None) and (
            getattr(text, "use_sliding_window", False)
            or "sliding_attention" in (getattr(text, "layer_types", None) or [])
        ):
            return "it uses sliding-window attention"
    try:
        return _probe(model, layout)
    except Exception as err:  # noqa: BLE001 - any failure of the probe means: do not use this layout
        return f"{type(err).__name__}: {err}"


@torch.no_grad()
def _probe(model: torch.nn.Module, layout: str) -> str | None:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = int(getattr(text, "vocab_size", 10) or 10)
    device = next(model.parameters()).device
    candidate = DataCollatorForPreference(0, **BatchLayout(layout, "first_fit").options())
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


def batch_layout(models: list[torch.nn.Module], wanted: BatchLayout) -> BatchLayout:
    """The layout closest to `wanted` that every model of `models` takes, falling back from prefix-shared to packed
    to padded (`BatchLayout.fallback`) with one log line each. `padding_free` (one packed row) is honoured as
    documented unless a model cannot take packed rows at all."""
    for kind in (PREFIX_SHARED, PACKED):
        if wanted.kind != kind:
            continue
        for model in models:
            problem = layout_problem(model, kind)
            if problem:
                fallback = wanted.fallback()
                logger.warning(
                    "%s cannot take %s batches (%s); using %s batches",
                    type(model).__name__,
                    kind.replace("_", "-"),
                    problem,
                    fallback.kind,
                )
                wanted = fallback
                break
    return wanted
