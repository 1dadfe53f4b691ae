"""The embedded default: a tiny chat model, its tokenizer and a judged preference task, all built in code."""

BUILTIN_MODEL = "builtin:tiny-llama"
BUILTIN_DATA = "builtin:sentiment"
