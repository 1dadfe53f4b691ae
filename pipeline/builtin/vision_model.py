"""The built-in vision-language base: a word-level Llava processor and a tiny Llava model (its warm start:
`pipeline.run.warm_start_vision`).

The processor pairs a word-level tokenizer over the vision-colors vocabulary (plus an `<image>` token) with
a pillow-only CLIP image processor; the model is a small CLIP vision tower feeding a small Llama through
Llava's projector. A short supervised pass mostly names each picture's confusion colour
(`warmup_positive_fraction` of the time the right one), so the reference can say both but usually says the
wrong one: the room DPO has to improve.
"""

from __future__ import annotations

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

from pipeline.builtin import vision_task
from pipeline.builtin.tokenizer import SPECIAL_TOKENS as TEXT_SPECIAL_TOKENS
from pipeline.builtin.tokenizer import word_level_tokenizer

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
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_vision_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy=FEATURE_STRATEGY,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS position, removed again by the "default" strategy
    )


def build_vision_model(
    processor: LlavaProcessor,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    max_positions: int = 128,
) -> LlavaForConditionalGeneration:
    """A tiny Llava: a CLIP vision tower over the processor's crop and patch size, a Llama text model."""
    tokenizer = processor.tokenizer
    image_size = processor.image_processor.crop_size["height"]
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_hidden_size * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=processor.patch_size,
        projection_dim=vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        image_seq_length=num_image_tokens(image_size, processor.patch_size),
        vision_feature_select_strategy=FEATURE_STRATEGY,
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
