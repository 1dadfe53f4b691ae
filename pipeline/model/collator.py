"""Batches of preference pairs, in one of three layouts the model sees; the losses always see the same one.

Whatever the layout, a batch carries `completion_mask` ([2N, L]) in the *per-sequence* layout: rows `0..N-1`
prompt+chosen, rows `N..2N-1` prompt+rejected, right padded. Precomputed reference log-probs, when the features
carry them, come along as `ref_chosen_logps`/`ref_rejected_logps` ([N]) and `ref_token_logps` ([2N, L], each value
at the position of its token). What the model runs on:

- **padded**: `input_ids`/`attention_mask` in that same per-sequence layout (each prompt runs twice).
- **packed**: the 2N sequences back to back in rows, `position_ids` restarting at 0 for each, which is how the
  model's attention keeps them apart (no attention mask). `padding_free` puts them all in one row.
- **prefix-shared**: one segment per pair, prompt then chosen then rejected, so the prompt runs once; the
  rejected completion's `position_ids` restart where the prompt ends, and `segment_ids`/`part_ids` (prompt 0,
  chosen 1, rejected 2) define the attention mask (`pipeline.model.attention`): a completion sees its own prompt and
  itself, never the other completion.

The packed and prefix-shared layouts fill each row with several segments (first fit, longest first) up to the
longest segment's length, so no row is longer than in a batch of one segment per row, and carry the map back to
the per-sequence layout: `packed_index[i, t]` is the flat position (row · width + column) whose output predicts
token t+1 of sequence i, `label_ids[i, t]` that token, `packed_valid[i, t]` whether it exists, and
`num_tokens` the tokens of the per-sequence layout (the count a padded batch reports).

`DataCollatorForVisionPreference` collates pairs with images (an `images` feature of stored images,
`pipeline.data.images`) in the padded layout and adds the pixel inputs its image processor makes from them, at
batch time: the images of sequence 0, 1, ..., 2N-1 in that order (each pair's images twice, for its chosen and its
rejected sequence), the order in which a model meets their image tokens in the batch. Every key of a batch that is
not one of `PAIR_BATCH_KEYS` is a model input, passed to the model's forward as it is (`pipeline.model.head.forward`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipeline.data.images import open_image
from pipeline.model.batch_layout import PADDED, PREFIX_SHARED, BatchLayout

PROMPT, CHOSEN, REJECTED = 0, 1, 2  # part_ids of a prefix-shared segment
# what the collators put in a batch besides the model's extra inputs (pixel values and the like)
PAIR_BATCH_KEYS = frozenset(
    {
        "input_ids",
        "attention_mask",
        "position_ids",
        "completion_mask",
        "packed_index",
        "packed_valid",
        "label_ids",
        "num_tokens",
        "segment_ids",
        "part_ids",
        "ref_chosen_logps",
        "ref_rejected_logps",
        "ref_token_logps",
    }
)


def _pad(rows: list[list], value, multiple: int | None, dtype) -> torch.Tensor:
    length = max(len(r) for r in rows)
    if multiple:
        length = -(-length // multiple) * multiple
    out = torch.full((len(rows), length), value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of items of these lengths in rows of at most `capacity` (an item longer than that alone):
    longest first, each into the first row it fits (first-fit decreasing)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


@dataclass
class DataCollatorForPreference:
    """Collates tokenized pairs (`prompt_ids`, `chosen_ids`, `rejected_ids`) in the layout its options ask for
    (`BatchLayout.of_options`): padded, or packed (`padding_free`, or `packing`), or prefix-shared (`prefix_sharing`,
    several segments per row unless `packing` is off)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    padding_free: bool = False
    prefix_sharing: bool = False
    packing: bool = False

    @property
    def layout(self) -> BatchLayout:
        return BatchLayout.of_options(self.prefix_sharing, self.packing, self.padding_free)

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
        layout = self.layout
        if layout.kind == PADDED:
            batch["input_ids"] = _pad(sequences, self.pad_token_id, self.pad_to_multiple_of, torch.long)
            batch["attention_mask"] = _pad([[1] * len(s) for s in sequences], 0, self.pad_to_multiple_of, torch.long)
        else:
            batch.update(self._rows(layout, features, sequences, batch["completion_mask"].shape[1]))
        if "ref_chosen_logps" in features[0]:
            batch["ref_chosen_logps"] = torch.tensor([f["ref_chosen_logps"] for f in features], dtype=torch.float32)
            batch["ref_rejected_logps"] = torch.tensor([f["ref_rejected_logps"] for f in features], dtype=torch.float32)
        if ref_tokens:
            batch["ref_token_logps"] = _pad(ref_tokens, 0.0, self.pad_to_multiple_of, torch.float32)
        return batch

    def _rows(
        self, layout: BatchLayout, features: list[dict], sequences: list[list[int]], width: int
    ) -> dict[str, torch.Tensor]:
        """The packed or prefix-shared rows of the batch and the map back to its 2N sequences (see the module)."""
        n = len(features)
        # segments: (token ids, position ids, part ids, [(sequence, [column of the output predicting its token t+1])])
        segments = []
        if layout.kind == PREFIX_SHARED:
            for i, f in enumerate(features):
                p, c, r = len(f["prompt_ids"]), len(f["chosen_ids"]), len(f["rejected_ids"])
                ids = list(f["prompt_ids"]) + list(f["chosen_ids"]) + list(f["rejected_ids"])
                positions = list(range(p + c)) + list(range(p, p + r))
                parts = [PROMPT] * p + [CHOSEN] * c + [REJECTED] * r
                # rejected token t+1 (t ≥ p-1) follows the prompt's last token, then its own tokens
                rejected = list(range(p - 1)) + [p - 1] + list(range(p + c, p + c + r - 1))
                segments.append((ids, positions, parts, [(i, list(range(p + c - 1))), (n + i, rejected)]))
        else:
            for i, s in enumerate(sequences):
                segments.append((s, list(range(len(s))), [PROMPT] * len(s), [(i, list(range(len(s) - 1)))]))
        lengths = [len(s[0]) for s in segments]
        row_width = sum(lengths) if layout.rows == "one" else max(lengths)
        if self.pad_to_multiple_of:
            row_width = -(-row_width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        if layout.rows == "one":
            rows = [list(range(len(segments)))]
        else:
            rows = first_fit(lengths, row_width) if layout.rows == "first_fit" else [[k] for k in range(len(segments))]
        shape = (len(rows), row_width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        segment_ids = torch.full(shape, -1, dtype=torch.long)
        part_ids = torch.zeros(shape, dtype=torch.long)
        index = torch.zeros((len(sequences), width - 1), dtype=torch.long)
        valid = torch.zeros((len(sequences), width - 1), dtype=torch.bool)
        labels = torch.full((len(sequences), width - 1), self.pad_token_id, dtype=torch.long)
        for r, members in enumerate(rows):
            start = 0
            for k in members:
                ids, positions, parts, maps = segments[k]
                end = start + len(ids)
                input_ids[r, start:end] = torch.tensor(ids)
                position_ids[r, start:end] = torch.tensor(positions)
                segment_ids[r, start:end] = k
                part_ids[r, start:end] = torch.tensor(parts)
                for sequence, columns in maps:
                    index[sequence, : len(columns)] = r * row_width + start + torch.tensor(columns, dtype=torch.long)
                    valid[sequence, : len(columns)] = True
                    labels[sequence, : len(columns)] = torch.tensor(sequences[sequence][1:], dtype=torch.long)
                start = end
            # the row's padding: positions restarting at 0, so it reads as one more sequence of its own
            position_ids[r, start:] = torch.arange(row_width - start)
        batch = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "packed_index": index,
            "packed_valid": valid,
            "label_ids": labels,
            "num_tokens": torch.tensor(sum(len(s) for s in sequences)),
        }
        if layout.kind == PREFIX_SHARED:
            batch.update(segment_ids=segment_ids, part_ids=part_ids)
        return batch


@dataclass
class DataCollatorForVisionPreference(DataCollatorForPreference):
    """Collates tokenized pairs with their images (see the module docstring): the padded layout, plus what the
    processor's image processor makes of the images (`pixel_values`, and e.g. `image_sizes` or `image_grid_thw`
    for the model families that take them)."""

    processor: Any = None

    def __post_init__(self):
        if self.processor is None or getattr(self.processor, "image_processor", None) is None:
            raise ValueError("DataCollatorForVisionPreference needs the model's processor (with an image processor)")
        # pixel inputs come in sequence order, which only the one-sequence-per-row layout keeps
        self.prefix_sharing = self.packing = self.padding_free = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(features)
        per_pair = [[open_image(image) for image in f.get("images") or []] for f in features]
        images = [image for _side in ("chosen", "rejected") for pair in per_pair for image in pair]
        if images:
            pixels = self.processor.image_processor(images=images, return_tensors="pt")
            batch.update({key: value for key, value in pixels.items() if isinstance(value, torch.Tensor)})
        return batch
