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
def wpo_log_weights(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log w of WPO (arXiv 2406.11827 eq. 2): mean over completion tokens of log p(y_t) − log Σ_v p_t(v)²."""
    out = []
    for rows, row_labels, row_mask in zip(logits.split(ROW_CHUNK), labels.split(ROW_CHUNK), mask.split(ROW_CHUNK)):
        logp_all = torch.log_softmax(rows.float(), dim=-1)
        picked = logp_all.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        log_sum_sq = torch.logsumexp(2 * logp_all, dim=-1)
        m = row_mask.float()
        out.append(((picked - log_sum_sq) * m).sum(-1) / m.sum(-1).clamp(min=1))
    return torch.cat(out)


@torch.no_grad()
def token_statistics(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row sums over completion tokens: vocabulary-mean logit, entropy, argmax hits, token count.

    Sums (not means) so metrics can be token-weighted across batches and ranks.
    """
    logit_mean, entropy, correct = [], [], []
    for rows, row_labels, row_mask in zip(logits.split(ROW_CHUNK), labels.split(ROW_CHUNK), mask.split(ROW_CHUNK)):
        rows = rows.float()
        m = row_mask.float()
        logp = torch.log_softmax(rows, dim=-1)
        logit_mean.append((rows.mean(-1) * m).sum(-1))
        entropy.append((-(logp.exp() * logp).sum(-1) * m).sum(-1))
        correct.append(((rows.argmax(-1) == row_labels).float() * m).sum(-1))
    return {"logits_sum": torch.cat(logit_mean), "entropy_sum": torch.cat(entropy),
            "correct": torch.cat(correct), "tokens": mask.float().sum(-1)}
