"""From logits to what the losses and metrics need: per-token and per-sequence log-probs.

Every function takes label-aligned tensors: `logits[:, t]` predicts `labels[:, t]`, and `mask`
marks the completion tokens (prompt and padding contribute nothing).
"""

from __future__ import annotations

import torch

ROW_CHUNK = 8  # rows of logits turned into log-probs at once: bounds the [rows, T, V] temporaries


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label_t) per position, = logit − logsumexp, without materializing the full log-softmax."""
    out = []
    for rows, row_labels in zip(logits.split(ROW_CHUNK), labels.split(ROW_CHUNK)):
        picked = rows.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1).float()
        out.append(picked - torch.logsumexp(rows.float(), dim=-1))
    return torch.cat(out)


def ld_token_weights(mask: torch.Tensor, shared_lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """LD-DPO weights: 1 for the first `shared_lengths[i]` completion tokens of row i, α after them."""
    position = mask.long().cumsum(-1) - 1  # index of each token within its completion
    inside = position < shared_lengths.unsqueeze(-1)
    return torch.where(inside, 1.0, alpha) * mask


def sequence_logps(per_token: torch.Tensor, mask: torch.Tensor, ld_alpha: float | None = None,
                   shared_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Summed completion log-prob of each row; with `ld_alpha`, the LD-DPO length-desensitised sum."""
    weights = mask.to(per_token.dtype) if ld_alpha is None else ld_token_weights(mask, shared_lengths, ld_alpha).to(per_token.dtype)
    return (per_token * weights).sum(-1)


@torch.no_grad()
def token_diagnostics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position values for the metrics and for WPO, in one pass over the vocabulary:
    the vocabulary-mean logit, the predictive entropy, whether the argmax is the label, and
    log p(label) − log Σ_v p(v)² (the WPO term, arXiv 2406.11827 eq. 2)."""
    mean_logit, entropy, hit, wpo = [], [], [], []
    for rows, row_labels in zip(logits.split(ROW_CHUNK), labels.split(ROW_CHUNK)):
        rows = rows.float()
        logp = torch.log_softmax(rows, dim=-1)
        picked = logp.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        mean_logit.append(rows.mean(-1))
        entropy.append(-(logp.exp() * logp).sum(-1))
        hit.append((rows.argmax(-1) == row_labels).float())
        wpo.append(picked - torch.logsumexp(2 * logp, dim=-1))
    return {"mean_logit": torch.cat(mean_logit), "entropy": torch.cat(entropy), "hit": torch.cat(hit),
            "wpo_term": torch.cat(wpo)}


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1).clamp(min=1)


def wpo_log_weights(diagnostics: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """log w of WPO per sequence: the mean over its completion tokens of the WPO term."""
    return masked_mean(diagnostics["wpo_term"], mask)


def unpack(packed: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-position values of a padding-free batch ([1, T]) laid out per sequence ([rows, L]) via `index`."""
    return packed[0][index] * valid.to(packed.dtype)
