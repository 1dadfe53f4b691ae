"""The built-in vision default: the vision-colors task, its judge, and the tiny Llava base (build, save, reload)."""

from __future__ import annotations

import random

import pytest
import torch

from pipeline.builtin import BUILTIN_VLM, vision_model, vision_task
from pipeline.run import warm_start_vision
from pipeline.store.base_record import MODEL_SUBDIR

TINY = {
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "warmup_steps": 3,
    "warmup_batch_size": 4,
    "warmup_learning_rate": 3e-3,
    "warmup_positive_fraction": 0.3,
}


def test_dominant_color_agrees_with_make_image():
    rng = random.Random(0)
    for _ in range(200):
        color = rng.choice(vision_task.COLOR_NAMES)
        image = vision_task.make_image(color, rng)
        assert image.mode == "RGB" and image.size == (vision_task.IMAGE_SIZE, vision_task.IMAGE_SIZE)
        assert vision_task.dominant_color(image) == color


def test_confusion_is_a_permutation_without_fixed_points():
    assert sorted(vision_task.CONFUSION.values()) == sorted(vision_task.COLOR_NAMES)
    assert all(k != v for k, v in vision_task.CONFUSION.items())


def test_pairs_are_distinct_and_well_formed():
    rows = vision_task.preference_pairs(60, seed=1)
    assert len(rows) == 60
    assert len({r["images"][0].tobytes() for r in rows}) == 60
    vocab = set(vision_task.vocabulary())
    for r in rows:
        assert set(r) == {"images", "prompt", "chosen", "rejected"}
        (image,) = r["images"]
        (user,) = r["prompt"]
        assert user["role"] == "user" and user["content"][0] == {"type": "image"}
        assert user["content"][1]["type"] == "text" and set(user["content"][1]["text"].split()) <= vocab
        chosen, rejected = r["chosen"][0]["content"][0]["text"], r["rejected"][0]["content"][0]["text"]
        assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
        assert vision_task.named_color(chosen) == vision_task.dominant_color(image)
        assert vision_task.named_color(rejected) not in (None, vision_task.dominant_color(image))
        assert vision_task.judge(image, chosen) == 1.0 and vision_task.judge(image, rejected) == -1.0
    other = vision_task.preference_pairs(60, seed=2)
    assert not {r["images"][0].tobytes() for r in rows} & {r["images"][0].tobytes() for r in other}
    assert [r["chosen"] for r in vision_task.preference_pairs(5, seed=1)] == [r["chosen"] for r in rows[:5]]


def test_judge_and_win_rate():
    image = vision_task.make_image("blue", random.Random(3))
    assert vision_task.judge(image, "The picture is mostly blue .") == 1.0
    assert vision_task.judge([image], "It  is mainly blue .") == 1.0
    assert vision_task.judge(image, "Most of the image is red .") == -1.0
    for bad in (
        "",
        "blue",
        "The picture is mostly .",
        "The picture is mostly blue blue .",
        "The picture is mostly pink .",
    ):
        assert vision_task.judge(image, bad) == vision_task.MALFORMED
    rate, outcomes = vision_task.win_rate(
        [image] * 3,
        ["It is mainly blue .", "It is mainly red .", "x"],
        ["It is mainly red .", "It is mainly red .", "It is mainly red ."],
    )
    assert outcomes == [1.0, 0.5, 0.0] and rate == pytest.approx(0.5)


def test_warmup_examples_name_right_or_confusion_color():
    rows = vision_task.warmup_examples(200, positive_fraction=0.3, seed=4)
    right = 0
    for r in rows:
        color = vision_task.dominant_color(r["images"][0])
        named = vision_task.named_color(r["completion"][0]["content"][0]["text"])
        assert named in (color, vision_task.CONFUSION[color])
        right += named == color
    assert 0.15 < right / len(rows) < 0.45


def test_processor_expands_image_to_model_features():
    processor = vision_model.build_vision_processor()
    model = vision_model.build_vision_model(
        processor, seed=0, hidden_size=32, num_layers=1, num_heads=2, vision_hidden_size=16, vision_layers=1
    )
    row = vision_task.preference_pairs(2, seed=0)
    text = [processor.apply_chat_template(r["prompt"] + r["chosen"], tokenize=False) for r in row]
    inputs = processor(text=text, images=[r["images"][0] for r in row], padding=True, return_tensors="pt")
    per_row = (inputs["input_ids"] == processor.image_token_id).sum(-1)
    assert per_row.tolist() == [vision_model.num_image_tokens()] * 2
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"])
        out = model(**inputs)
    features = torch.cat(list(features.pooler_output))
    assert features.shape == (per_row.sum(), model.config.text_config.hidden_size)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    # the string form of content renders like the list form, with and without a generation prompt
    as_string = [{"role": "user", "content": "What colour is this picture ?"}]
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "What colour is this picture ?"}]}]
    for add in (False, True):
        rendered = processor.apply_chat_template(as_string, tokenize=False, add_generation_prompt=add)
        assert (
            rendered.split()
            == processor.apply_chat_template(as_parts, tokenize=False, add_generation_prompt=add).split()
        )
        assert (
            rendered.split()
            == processor.tokenizer.apply_chat_template(as_string, tokenize=False, add_generation_prompt=add).split()
        )
        assert rendered.rstrip().endswith("<|assistant|>") == add


def test_builtin_vision_base_saves_and_reloads_offline(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    info = warm_start_vision.build_builtin_vision_base({"seed": 0, "model": {"builtin": TINY}}, tmp_path)
    assert info["source"] == BUILTIN_VLM and info["revision"] is None and info["num_parameters"] > 0
    assert info["warmup_loss_first"] > 0 and info["warmup_loss_last"] > 0
    saved = tmp_path / MODEL_SUBDIR
    processor = AutoProcessor.from_pretrained(saved, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(saved, local_files_only=True).eval()
    fresh = vision_model.build_vision_processor()
    assert processor.tokenizer.get_vocab() == fresh.tokenizer.get_vocab()

    row = vision_task.preference_pairs(1, seed=5)[0]
    prompt = processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    assert prompt == fresh.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=row["images"], return_tensors="pt")
    again = fresh(text=[prompt], images=row["images"], return_tensors="pt")
    assert torch.equal(inputs["input_ids"], again["input_ids"])
    assert torch.allclose(inputs["pixel_values"], again["pixel_values"])

    reloaded = AutoModelForImageTextToText.from_pretrained(saved, local_files_only=True).eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(
        processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0], str
    )


def test_warm_start_masks_the_prompt_and_lowers_the_loss():
    processor = vision_model.build_vision_processor()
    example = vision_task.warmup_examples(1, 1.0, seed=6)[0]
    encoded = warm_start_vision.encode_example(processor, example)
    completion = processor.tokenizer.decode(encoded["input_ids"][encoded["completion_mask"]], skip_special_tokens=True)
    assert completion.split() == example["completion"][0]["content"][0]["text"].split()
    model = vision_model.build_vision_model(
        processor, seed=0, hidden_size=32, num_layers=1, num_heads=2, vision_hidden_size=16, vision_layers=1
    )
    history = warm_start_vision.warm_start_vision(
        model,
        processor,
        vision_task.warmup_examples(16, 0.3, seed=7),
        steps=15,
        batch_size=8,
        learning_rate=3e-3,
        seed=0,
    )
    assert len(history) == 15 and history[-1] < history[0]
