"""The embedded defaults, built in code: a tiny chat model and its tokenizer with a judged preference task
(`builtin:sentiment`), and a tiny vision-language model and its processor with a judged picture task
(`builtin:vision-colors`, `vision/params.yaml`)."""

BUILTIN_MODEL = "builtin:tiny-llama"
BUILTIN_DATA = "builtin:sentiment"
BUILTIN_VLM = "builtin:tiny-llava"
BUILTIN_VISION_DATA = "builtin:vision-colors"
BUILTIN_MODELS = (BUILTIN_MODEL, BUILTIN_VLM)
BUILTIN_DATASETS = (BUILTIN_DATA, BUILTIN_VISION_DATA)
