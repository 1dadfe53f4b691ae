"""Batches of preference pairs: chosen and rejected sequences stacked into one padded batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _pad(rows: list[list], value, multiple: int | None, dtype) -> torch.Tensor:
    length = max(len(r) for r in rows)
    if multiple:
        length = -(-length // multiple) * multiple
    out = torch.full((len(rows), length), value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=dtype)
    return out


@dataclass
class DataCollatorForPreference:
    """Rows `0..N-1` of the batch are prompt+chosen, rows `N..2N-1` prompt+rejected (right padded).

    `completion_mask` marks completion tokens. Precomputed reference log-probs, when the features
    carry them, come along as `ref_chosen_logps`/`ref_rejected_logps` ([N]) and `ref_token_logps`
    ([2N, T], each value at the position of its token) for token re-weighting such as `ld_alpha`.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        sequences, completion_masks, ref_tokens = [], [], []
        for side in ("chosen", "rejected"):
            for f in features:
                prompt, completion = list(f["prompt_ids"]), list(f[f"{side}_ids"])
                sequences.append(prompt + completion)
                completion_masks.append([0] * len(prompt) + [1] * len(completion))
                if "ref_chosen_token_logps" in f:
                    ref_tokens.append([0.0] * len(prompt) + list(f[f"ref_{side}_token_logps"]))
        batch = {
            "input_ids": _pad(sequences, self.pad_token_id, self.pad_to_multiple_of, torch.long),
            "attention_mask": _pad([[1] * len(s) for s in sequences], 0, self.pad_to_multiple_of, torch.long),
            "completion_mask": _pad(completion_masks, 0, self.pad_to_multiple_of, torch.long),
        }
        if "ref_chosen_logps" in features[0]:
            batch["ref_chosen_logps"] = torch.tensor([f["ref_chosen_logps"] for f in features], dtype=torch.float32)
            batch["ref_rejected_logps"] = torch.tensor([f["ref_rejected_logps"] for f in features], dtype=torch.float32)
        if ref_tokens:
            batch["ref_token_logps"] = _pad(ref_tokens, 0.0, self.pad_to_multiple_of, torch.float32)
        return batch
