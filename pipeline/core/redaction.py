"""Credentials never reach a record: the one place that knows which values are secret and masks them.

A credential is the value of a credential field (TrainingArguments' `*_token` fields, the rule transformers
itself masks by, and the `token` keyword of from_pretrained kwargs), any value equal to, or containing, the
Hub token in the environment (HF_TOKEN, HUGGING_FACE_HUB_TOKEN), or any text shaped like a Hugging Face
token (`HF_TOKEN_PATTERN`: `hf_` and 30 or more letters and digits). `redact` is applied wherever params are
recorded (manifests, the model card) and to user-facing error messages; params.yaml refuses credential
fields and token-shaped values outright (`credential_keys`, `HF_TOKEN_PATTERN`), so these are the second line.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any

REDACTED = "<redacted>"
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
KWARGS_CREDENTIAL_KEYS = frozenset({"token", "use_auth_token"})  # from_pretrained's keyword arguments
HF_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{30,}")  # a Hugging Face access token (hf_ and 34 characters today)


@functools.cache
def credential_fields() -> frozenset[str]:
    """TrainingArguments fields that hold a credential (today: hub_token)."""
    from transformers import TrainingArguments

    return frozenset(f.name for f in dataclasses.fields(TrainingArguments) if f.name.endswith("_token"))


def credential_keys() -> frozenset[str]:
    return credential_fields() | KWARGS_CREDENTIAL_KEYS


def env_tokens() -> list[str]:
    """The Hub tokens set in the environment (longest first, so one containing another is masked whole)."""
    values = {os.environ.get(name, "").strip() for name in TOKEN_ENV_VARS}
    return sorted((v for v in values if len(v) >= 8), key=len, reverse=True)  # short values would mask ordinary text


def looks_like_token(text: str) -> bool:
    return HF_TOKEN_PATTERN.search(text) is not None


def redact_text(text: str) -> str:
    """`text` with the environment's Hub tokens and any Hugging Face token-shaped text masked."""
    for token in env_tokens():
        text = text.replace(token, REDACTED)
    return HF_TOKEN_PATTERN.sub(REDACTED, text)


def redact(value: Any) -> Any:
    """`value` (params: nested dicts, lists, scalars) with credential fields' values and environment tokens masked."""
    if isinstance(value, dict):
        return {k: (REDACTED if k in credential_keys() and v is not None else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value
