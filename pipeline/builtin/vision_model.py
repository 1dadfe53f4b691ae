"""The built-in vision-language base: a word-level Llava processor, a tiny Llava model, and its warm start.

The processor pairs a word-level tokenizer over the vision-colors vocabulary (plus an `<image>` token) with
a pillow-only CLIP image processor; the model is a small CLIP vision tower feeding a small Llama through
Llava's projector. A short supervised pass mostly names each picture's confusion colour
(`warmup_positive_fraction` of the time the right one), so the reference can say both but usually says the
wrong one: the room DPO has to improve.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from . import BUILTIN_VLM, vision_task
from .tokenizer import SPECIAL_TOKENS as TEXT_SPECIAL_TOKENS
from .tokenizer import word_level_tokenizer
from .warm_start import supervised_pass

MODEL_SUBDIR = "model"
IMAGE_TOKEN = "<image>"
PATCH_SIZE = 8  # IMAGE_SIZE 32 / 8: a 4×4 grid, 16 image tokens per picture
FEATURE_STRATEGY = "default"  # drop the vision tower's CLS position: features = patches only
SPECIAL_TOKENS = (*TEXT_SPECIAL_TOKENS, IMAGE_TOKEN)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}<|{{ message['role'] }}|> "
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}" + IMAGE_TOKEN + " "
    "{% elif part['type'] == 'text' %}{{ part['text'] }} {% endif %}"
    "{% endfor %}{% endif %}<|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def num_image_tokens(image_size: int = vision_task.IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> int:
    """How many `<image>` positions one picture takes (= image features the model produces)."""
    return (image_size // patch_size) ** 2


def build_vision_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level over the task's vocabulary; `<image>` is a special token, so runs of it split apart."""
    return word_level_tokenizer(vision_task.vocabulary(), SPECIAL_TOKENS, CHAT_TEMPLATE)


def build_vision_processor(image_size: int = vision_task.IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> LlavaProcessor:
    """A LlavaProcessor that expands each `<image>` into exactly the model's number of image features."""
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_vision_tokenizer(), patch_size=patch_size,
        vision_feature_select_strategy=FEATURE_STRATEGY, chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS position, removed again by the "default" strategy
    )


def build_vision_model(processor: LlavaProcessor, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                       num_heads: int = 4, vision_hidden_size: int = 32, vision_layers: int = 2,
                       vision_heads: int = 2, max_positions: int = 128) -> LlavaForConditionalGeneration:
    """A tiny Llava: a CLIP vision tower over the processor's crop and patch size, a Llama text model."""
    tokenizer = processor.tokenizer
    image_size = processor.image_processor.crop_size["height"]
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size, intermediate_size=vision_hidden_size * 2, num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads, image_size=image_size, patch_size=processor.patch_size, projection_dim=vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
        image_seq_length=num_image_tokens(image_size, processor.patch_size),
        vision_feature_select_strategy=FEATURE_STRATEGY, vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def encode_example(processor: LlavaProcessor, example: dict) -> dict:
    """One prompt→completion row as model inputs: input_ids, pixel_values, and the completion's mask."""
    prompt = processor.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
    full = processor.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
    prompt_len = processor(text=[prompt], images=example["images"], return_tensors="pt")["input_ids"].shape[1]
    inputs = processor(text=[full], images=example["images"], return_tensors="pt")
    ids = inputs["input_ids"][0]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[prompt_len:] = True
    return {"input_ids": ids, "pixel_values": inputs["pixel_values"], "completion_mask": mask}


def collate(rows: list[dict], pad_token_id: int) -> dict:
    """Right-pad a batch of `encode_example` rows."""
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    completion = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], attention[i, :n], completion[i, :n] = r["input_ids"], 1, r["completion_mask"]
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion,
            "pixel_values": torch.cat([r["pixel_values"] for r in rows])}


def warm_start_vision(model, processor, examples: list[dict], steps: int, batch_size: int, learning_rate: float,
                      seed: int) -> list[float]:
    """A short supervised pass on image+prompt→completion examples (loss on completion tokens only)."""
    rows = [encode_example(processor, ex) for ex in examples]

    def completion_nll(index: list[int]) -> torch.Tensor:
        batch = collate([rows[i] for i in index], processor.tokenizer.pad_token_id)
        ids, mask = batch["input_ids"], batch["completion_mask"][:, 1:]
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                       use_cache=False).logits[:, :-1]
        logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return -(logps * mask).sum() / mask.sum()
    return supervised_pass(model, len(rows), completion_nll, steps, batch_size, learning_rate, seed)


def build_builtin_vision_base(params: dict, out_dir: Path) -> dict:
    """Build the tiny built-in Llava and its processor, warm-start the model, and save both under out_dir/model."""
    cfg, seed = params["model"]["builtin"], params["seed"]
    processor = build_vision_processor()
    model = build_vision_model(processor, seed=seed, hidden_size=cfg["hidden_size"], num_layers=cfg["num_layers"],
                               num_heads=cfg["num_heads"])
    examples = vision_task.warmup_examples(cfg["warmup_steps"] * cfg["warmup_batch_size"] // 4 + 1,
                                           cfg["warmup_positive_fraction"], seed=seed + 3)
    history = warm_start_vision(model, processor, examples, cfg["warmup_steps"], cfg["warmup_batch_size"],
                                cfg["warmup_learning_rate"], seed)
    model.save_pretrained(out_dir / MODEL_SUBDIR)
    processor.save_pretrained(out_dir / MODEL_SUBDIR)
    return {"source": BUILTIN_VLM, "revision": None, "warmup_loss_first": history[0], "warmup_loss_last": history[-1],
            "num_parameters": sum(p.numel() for p in model.parameters())}
