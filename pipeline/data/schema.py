"""The canonical schema of normalized and tokenized artifacts: the one place it is defined.

Conversational fields (lists of messages, tool calls included) and `tools` /
`chat_template_kwargs` are stored as JSON text, so a Parquet round trip is lossless whatever keys
the messages carry. `images` (null on text rows) holds a vision row's images as encoded bytes with
their format (`pipeline.data.images`); the tokenized artifact of a split with images carries them on
(`TOKENIZED_VISION_SCHEMA`), so pixel inputs are made when a batch is collated.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

from pipeline.data.images import IMAGE_TYPE, image_digests

NORMALIZED_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("conversational", pa.bool_()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("tools", pa.string()),
        ("chat_template_kwargs", pa.string()),
        ("images", pa.list_(IMAGE_TYPE)),
    ]
)

TOKENIZED_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("chosen_ids", pa.list_(pa.int32())),
        ("rejected_ids", pa.list_(pa.int32())),
    ]
)
TOKENIZED_VISION_SCHEMA = TOKENIZED_SCHEMA.append(pa.field("images", pa.list_(IMAGE_TYPE)))

REF_LOGPS_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("ref_chosen_logps", pa.float64()),
        ("ref_rejected_logps", pa.float64()),
        # per completion token, so options that re-weight tokens (ld_alpha) need no second pass
        ("ref_chosen_token_logps", pa.list_(pa.float32())),
        ("ref_rejected_token_logps", pa.list_(pa.float32())),
    ]
)

SPLITS = ("train", "eval")


def encode_field(value: Any, conversational: bool) -> str:
    return json.dumps(value, ensure_ascii=False) if conversational else value


def decode_field(value: str | None, conversational: bool) -> Any:
    return json.loads(value) if conversational and value is not None else value


def encode_optional(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


def row_id_for(
    prompt: Any,
    chosen: Any,
    rejected: Any,
    tools: Any = None,
    chat_template_kwargs: Any = None,
    images: list[dict] | None = None,
) -> str:
    """A content digest of the canonical pair: stable across re-runs, reorderings and source formats
    (an implicit-prompt row and its explicit form get the same id); equal for duplicated pairs. It covers
    the images' bytes: the same question about another picture is another pair."""
    payload = [prompt, chosen, rejected, tools]
    if chat_template_kwargs:  # rendered differently, so a different pair
        payload.append(chat_template_kwargs)
    if images:
        payload.append({"images": image_digests(images)})
    return _digest(payload)


def prompt_id_for(prompt: Any, tools: Any = None, images: list[dict] | None = None) -> str:
    """A digest of what the model is conditioned on (its images included): pairs that share it go to the same split."""
    return _digest([prompt, tools] + ([image_digests(images)] if images else []))


def raw_row_id(raw: Any) -> str:
    """A digest of a raw row that could not be made canonical, so reports can still name it."""
    return (
        "raw:"
        + hashlib.sha256(json.dumps(raw, sort_keys=True, ensure_ascii=False, default=repr).encode()).hexdigest()[:16]
    )


def decoded_row(record: dict) -> dict:
    """A normalized Parquet record with its JSON fields decoded back to Python objects."""
    conv = record["conversational"]
    return {
        "row_id": record["row_id"],
        "conversational": conv,
        "prompt": decode_field(record["prompt"], conv),
        "chosen": decode_field(record["chosen"], conv),
        "rejected": decode_field(record["rejected"], conv),
        "tools": json.loads(record["tools"]) if record.get("tools") else None,
        "chat_template_kwargs": json.loads(record["chat_template_kwargs"])
        if record.get("chat_template_kwargs")
        else None,
        "images": record.get("images") or None,
    }
