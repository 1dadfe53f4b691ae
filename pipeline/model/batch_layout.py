"""The batch layout: how a batch of N preference pairs is laid out for the model, as one type.

The collator builds a batch in its layout (`pipeline.model.collator`), the layout probe falls back from one
layout to the next (`pipeline.model.layout`), and the model's forward and the log-prob head read which layout a
collated batch is in from `BatchLayout.of_batch`, the one place that tells it by the batch's keys. A new layout
is a new `kind` here, its rows in the collator, and its forward in `pipeline.model.head.forward`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Kind = Literal["padded", "packed", "prefix_shared"]
Rows = Literal["first_fit", "each", "one"]

PADDED: Kind = "padded"  # 2N sequences, one per row, right-padded, with an attention mask (each prompt runs twice)
PACKED: Kind = "packed"  # the 2N sequences back to back, position_ids restarting per sequence
PREFIX_SHARED: Kind = "prefix_shared"  # one segment per pair (prompt, chosen, rejected), a mask keeps them apart
KINDS: tuple[Kind, ...] = (PADDED, PACKED, PREFIX_SHARED)


@dataclass(frozen=True)
class BatchLayout:
    """`kind`: what a row holds; `rows`: how the packed kinds fill rows with sequences (or segments): `first_fit`
    (several per row, up to the longest one's length), `each` (one per row), `one` (all in one row)."""

    kind: Kind = PADDED
    rows: Rows = "each"

    @classmethod
    def of_options(cls, prefix_sharing: bool = False, packing: bool = False, padding_free: bool = False) -> BatchLayout:
        """The layout DPOConfig's options ask for: prefix-shared with `prefix_sharing`, else packed with `packing` or
        `padding_free`, else padded; `padding_free` puts every sequence in one row, `packing` several per row."""
        kind = PREFIX_SHARED if prefix_sharing else PACKED if (packing or padding_free) else PADDED
        if kind == PADDED:
            return cls()
        return cls(kind, "one" if padding_free else "first_fit" if packing else "each")

    def options(self) -> dict[str, bool]:
        """The DPOConfig options (and the collator's keywords) of this layout: `of_options`'s inverse."""
        return {
            "prefix_sharing": self.kind == PREFIX_SHARED,
            "packing": self.rows == "first_fit",
            "padding_free": self.rows == "one",
        }

    def fallback(self) -> BatchLayout:
        """The next layout to try when a model cannot take this one: prefix-shared → packed (as many per row) →
        padded; packed keeps `one` row (padding_free) or first-fit rows, and one sequence per row packs nothing."""
        if self.kind == PREFIX_SHARED and self.rows != "each":
            return BatchLayout(PACKED, self.rows)
        return BatchLayout()

    @staticmethod
    def of_batch(batch: Mapping) -> Kind:
        """The kind of a collated batch, told by its keys: prefix-shared batches carry `segment_ids` (the mask's
        input), packed ones `packed_index` (the map back to the per-sequence layout), padded ones neither."""
        if "segment_ids" in batch:
            return PREFIX_SHARED
        return PACKED if "packed_index" in batch else PADDED
