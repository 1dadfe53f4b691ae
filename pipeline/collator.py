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
    padding_free: bool = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        sequences, completion_masks, ref_tokens = [], [], []
        for side in ("chosen", "rejected"):
            for f in features:
                prompt, completion = list(f["prompt_ids"]), list(f[f"{side}_ids"])
                sequences.append(prompt + completion)
                completion_masks.append([0] * len(prompt) + [1] * len(completion))
                if "ref_chosen_token_logps" in f:
                    ref_tokens.append([0.0] * len(prompt) + list(f[f"ref_{side}_token_logps"]))
        batch = {"completion_mask": _pad(completion_masks, 0, self.pad_to_multiple_of, torch.long)}
        if self.padding_free:
            batch.update(self._packed(sequences, batch["completion_mask"].shape[1]))
        else:
            batch["input_ids"] = _pad(sequences, self.pad_token_id, self.pad_to_multiple_of, torch.long)
            batch["attention_mask"] = _pad([[1] * len(s) for s in sequences], 0, self.pad_to_multiple_of, torch.long)
        if "ref_chosen_logps" in features[0]:
            batch["ref_chosen_logps"] = torch.tensor([f["ref_chosen_logps"] for f in features], dtype=torch.float32)
            batch["ref_rejected_logps"] = torch.tensor([f["ref_rejected_logps"] for f in features], dtype=torch.float32)
        if ref_tokens:
            batch["ref_token_logps"] = _pad(ref_tokens, 0.0, self.pad_to_multiple_of, torch.float32)
        return batch

    def _packed(self, sequences: list[list[int]], width: int) -> dict[str, torch.Tensor]:
        """One row holding every sequence back to back; `position_ids` restart at 0 for each, which
        is how the model's attention keeps them apart. `packed_index`/`packed_valid` map each
        label position of the packed row back to its sequence's row and column."""
        flat = [t for s in sequences for t in s]
        positions = [p for s in sequences for p in range(len(s))]
        if self.pad_to_multiple_of:
            extra = -len(flat) % self.pad_to_multiple_of
            flat += [self.pad_token_id] * extra
            positions += list(range(extra))
        index = torch.zeros((len(sequences), width - 1), dtype=torch.long)
        valid = torch.zeros((len(sequences), width - 1), dtype=torch.bool)
        start = 0
        for i, s in enumerate(sequences):
            index[i, :len(s) - 1] = torch.arange(start, start + len(s) - 1)
            valid[i, :len(s) - 1] = True
            start += len(s)
        return {"input_ids": torch.tensor([flat]), "position_ids": torch.tensor([positions]),
                "packed_index": index, "packed_valid": valid}
