"""From logits to what the losses and metrics need: per-token and per-sequence log-probs.

Every function takes label-aligned tensors: `logits[..., t, :]` predicts `labels[..., t]`, and `mask`
marks the completion tokens (prompt and padding contribute nothing). `label_logps` and
`vocab_diagnostics` are the arithmetic over the vocabulary, for any leading shape: the chunked output
layer (`pipeline.model.head`) applies them to a chunk of positions, `token_logps`/`token_diagnostics` to
whole `[rows, T, V]` logits.
"""

from __future__ import annotations

import torch

ROW_CHUNK = 8  # rows of logits turned into log-probs at once: bounds the [rows, T, V] temporaries


def label_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label) per position and the log-normalizer logsumexp_v z_v, in float32:
    logit − logsumexp, without materializing the full log-softmax."""
    logits = logits.float()
    normalizer = torch.logsumexp(logits, dim=-1)
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - normalizer, normalizer


@torch.no_grad()
def label_logps_backward(
    logits: torch.Tensor, labels: torch.Tensor, normalizer: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """The gradient through `label_logps` to the logits: g·(onehot(label) − softmax z), softmax z = exp(z − logsumexp z)
    from the forward's `normalizer`; in the logits' dtype (one [.., V] float32 buffer, updated in place)."""
    grad_logits = (logits.float() - normalizer.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))
    return grad_logits.scatter_add_(-1, labels.unsqueeze(-1), grad.unsqueeze(-1)).to(logits.dtype)


@torch.no_grad()
def vocab_diagnostics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position values for the metrics and for WPO from the logits z over the vocabulary: the
    vocabulary-mean logit, the predictive entropy −Σ_v p_v log p_v, whether the argmax is the label, and
    log p(label) − log Σ_v p_v² (the WPO term, arXiv 2406.11827 eq. 2).

    Two [.., V] temporaries next to the logits (log-probabilities, probabilities); the sums over the
    vocabulary are reductions, or in place."""
    logits = logits.float()
    mean_logit, hit = logits.mean(-1), (logits.argmax(-1) == labels).float()
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    probs = logp.exp()
    log_sum_sq = torch.linalg.vector_norm(probs, dim=-1).square().log()
    entropy = -probs.mul_(logp).sum(-1)
    return {"mean_logit": mean_logit, "entropy": entropy, "hit": hit, "wpo_term": picked - log_sum_sq}


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label_t) per position of whole `[rows, T, V]` logits, a few rows at a time."""
    return torch.cat(
        [label_logps(rows, row_labels)[0] for rows, row_labels in zip(logits.split(ROW_CHUNK), labels.split(ROW_CHUNK))]
    )


@torch.no_grad()
def token_diagnostics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """`vocab_diagnostics` per position of whole `[rows, T, V]` logits, a few rows at a time."""
    parts = [
        vocab_diagnostics(rows, row_labels)
        for rows, row_labels in zip(logits.split(ROW_CHUNK), labels.split(ROW_CHUNK))
    ]
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def ld_token_weights(mask: torch.Tensor, shared_lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """LD-DPO weights: 1 for the first `shared_lengths[i]` completion tokens of row i, α after them."""
    position = mask.long().cumsum(-1) - 1  # index of each token within its completion
    inside = position < shared_lengths.unsqueeze(-1)
    return torch.where(inside, 1.0, alpha) * mask


def sequence_logps(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    ld_alpha: float | None = None,
    shared_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed completion log-prob of each row; with `ld_alpha`, the LD-DPO length-desensitised sum."""
    weights = (
        mask.to(per_token.dtype)
        if ld_alpha is None
        else ld_token_weights(mask, shared_lengths, ld_alpha).to(per_token.dtype)
    )
    return (per_token * weights).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1).clamp(min=1)


def wpo_log_weights(diagnostics: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """log w of WPO per sequence: the mean over its completion tokens of the WPO term."""
    return masked_mean(diagnostics["wpo_term"], mask)
