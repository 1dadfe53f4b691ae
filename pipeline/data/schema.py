"""The canonical schema of normalized and tokenized artifacts: the one place it is defined.

Conversational fields (lists of messages, tool calls included) and `tools` /
`chat_template_kwargs` are stored as JSON text, so a Parquet round trip is lossless whatever keys
the messages carry.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

NORMALIZED_SCHEMA = pa.schema([
    ("row_id", pa.string()),
    ("conversational", pa.bool_()),
    ("prompt", pa.string()),
    ("chosen", pa.string()),
    ("rejected", pa.string()),
    ("tools", pa.string()),
    ("chat_template_kwargs", pa.string()),
])

TOKENIZED_SCHEMA = pa.schema([
    ("row_id", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("chosen_ids", pa.list_(pa.int32())),
    ("rejected_ids", pa.list_(pa.int32())),
])

REF_LOGPS_SCHEMA = pa.schema([
    ("row_id", pa.string()),
    ("ref_chosen_logps", pa.float64()),
    ("ref_rejected_logps", pa.float64()),
    # per completion token, so options that re-weight tokens (ld_alpha) need no second pass
    ("ref_chosen_token_logps", pa.list_(pa.float32())),
    ("ref_rejected_token_logps", pa.list_(pa.float32())),
])

SPLITS = ("train", "eval")


def encode_field(value: Any, conversational: bool) -> str:
    return json.dumps(value, ensure_ascii=False) if conversational else value


def decode_field(value: str | None, conversational: bool) -> Any:
    return json.loads(value) if conversational and value is not None else value


def encode_optional(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def row_id_for(prompt: Any, chosen: Any, rejected: Any, tools: Any = None) -> str:
    """A content digest: stable across re-runs and reorderings; equal for duplicated pairs."""
    payload = json.dumps([prompt, chosen, rejected, tools], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


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
        "chat_template_kwargs": json.loads(record["chat_template_kwargs"]) if record.get("chat_template_kwargs") else None,
    }
