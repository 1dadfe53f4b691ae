"""The processing class: a tokenizer, or a vision-language model's processor (a tokenizer and an image processor).

Everything that needs the tokenizer's ids (pad, BOS, EOS, the vocabulary) asks `tokenizer_of`; what needs the
images asks `image_token_id`. A processor is recognised by what it holds (a
`tokenizer` and an `image_processor`), not by its class, so any model family's processor works.
"""

from __future__ import annotations

from typing import Any


def is_processor(processing_class: Any) -> bool:
    """Whether `processing_class` is a multimodal processor (holds a tokenizer and an image processor)."""
    return (
        getattr(processing_class, "tokenizer", None) is not None
        and getattr(processing_class, "image_processor", None) is not None
    )


def tokenizer_of(processing_class: Any):
    """The tokenizer of a processing class (itself when it is a tokenizer)."""
    return processing_class.tokenizer if is_processor(processing_class) else processing_class


def image_token_id(processing_class: Any) -> int | None:
    """The id of the token a processor expands each image into (None for a tokenizer)."""
    if not is_processor(processing_class):
        return None
    token_id = getattr(processing_class, "image_token_id", None)
    if token_id is None and getattr(processing_class, "image_token", None):
        token_id = processing_class.tokenizer.convert_tokens_to_ids(processing_class.image_token)
    return token_id


def chat_renderer(processing_class: Any):
    """What renders a conversation to text: the processor's chat template where it has one, else the tokenizer's."""
    if is_processor(processing_class) and getattr(processing_class, "chat_template", None):
        return processing_class
    return tokenizer_of(processing_class)
