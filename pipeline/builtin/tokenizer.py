"""A word-level tokenizer for the built-in task, built in code, with a chat template."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pipeline.builtin import task

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def word_level_tokenizer(
    words: list[str], special_tokens: tuple[str, ...], chat_template: str
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `special_tokens` (pad, unk, BOS, EOS, then the additional ones) and `words`,
    split on whitespace and decoded with single spaces, with `chat_template`."""
    vocab = {token: i for i, token in enumerate([*special_tokens, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    pad, unk, bos, eos, *more = special_tokens
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        additional_special_tokens=list(more),
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_tokenizer() -> PreTrainedTokenizerFast:
    return word_level_tokenizer(task.vocabulary(), SPECIAL_TOKENS, CHAT_TEMPLATE)
