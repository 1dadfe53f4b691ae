"""Vision-language preference training through the API: images in, every loss type, exact log-probs, the reference,
LoRA, export, and every validation rule of vision rows. A tiny LLaVA (CLIP tower + Llama) built in the test."""

from __future__ import annotations

import io
import json
import logging

import datasets
import pytest
import torch
from PIL import Image

from pipeline import DPOConfig, DPOTrainer
from pipeline.builtin import vision_task
from pipeline.builtin.vision_model import build_vision_model, build_vision_processor
from pipeline.core.errors import PipelineError
from pipeline.data.formats import canonical_pair
from pipeline.data.images import ImageFiles
from pipeline.data.invalid import InvalidRow
from pipeline.model.collator import DataCollatorForVisionPreference
from pipeline.objective.losses import LOSS_TYPES
from pipeline.run.trainer import DPOScorer  # a trainer built without data (it only scores)

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def processor():
    return build_vision_processor()


def vlm(processor, seed: int = 0):
    return build_vision_model(
        processor,
        seed=seed,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        vision_hidden_size=16,
        vision_layers=1,
        vision_heads=2,
    )


def rows(n: int = 8, seed: int = 1) -> list[dict]:
    return vision_task.preference_pairs(n, seed=seed)


def config(tmp_path, **overrides) -> DPOConfig:
    options = {
        "output_dir": str(tmp_path / "out"),
        "max_length": None,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "max_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "disable_tqdm": True,
        "precompute_ref_log_probs": False,
        "gradient_checkpointing": False,
    }
    options.update(overrides)
    return DPOConfig(**options)


def png(color=(255, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


# ---- training ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_every_loss_type_trains_a_step_with_images(tmp_path, processor, loss_type):
    model = vlm(processor)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = DPOTrainer(
        model=model,
        args=config(tmp_path, loss_type=[loss_type], label_smoothing=0.1),
        train_dataset=datasets.Dataset.from_list(rows()),
        processing_class=processor,
    )
    assert isinstance(trainer.data_collator, DataCollatorForVisionPreference)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert torch.isfinite(torch.tensor(logged["loss"]))
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert any("vision_tower" in n for n in changed) and any("language_model" in n for n in changed)


def test_all_documented_metrics_are_logged_and_the_chunked_head_is_used(tmp_path, processor, caplog):
    trainer = DPOTrainer(
        model=vlm(processor),
        args=config(tmp_path),
        train_dataset=datasets.Dataset.from_list(rows()),
        eval_dataset=datasets.Dataset.from_list(rows(4, seed=9)),
        processing_class=processor,
    )
    with caplog.at_level(logging.WARNING):
        trainer.train()
        metrics = trainer.evaluate()
    assert "full-vocabulary logits" not in caplog.text  # the language head is chunked
    names = (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
        "entropy",
        "mean_token_accuracy",
    )
    assert set(names) <= set(trainer.state.log_history[0]) and "num_tokens" in trainer.state.log_history[0]
    assert {f"eval_{n}" for n in names} <= set(metrics)


def test_row_logps_equal_a_plain_forward_on_the_processor_output(tmp_path, processor):
    model = vlm(processor).eval()
    row = rows(1)[0]
    trainer = DPOTrainer(
        model=model, args=config(tmp_path), train_dataset=datasets.Dataset.from_list([row]), processing_class=processor
    )
    batch = trainer.data_collator([trainer.train_dataset[0]])
    with torch.no_grad():
        per_token, _ = trainer._token_values(model, batch, diagnostics=False)
    mask = batch["completion_mask"][:, 1:].bool()
    got = (per_token * mask).sum(-1)
    for k, side in enumerate(("chosen", "rejected")):
        prompt = processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        full = processor.apply_chat_template(row["prompt"] + row[side], tokenize=False)
        prompt_len = len(processor(text=[prompt], images=row["images"], add_special_tokens=False)["input_ids"][0])
        inputs = processor(text=[full], images=row["images"], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            logits = model(**inputs).logits[0, :-1].float()
        labels = inputs["input_ids"][0, 1:]
        want = torch.log_softmax(logits, -1).gather(-1, labels[:, None])[prompt_len - 1 :].sum()
        torch.testing.assert_close(got[k], want, **TOL)


def test_precomputed_and_online_reference_agree(tmp_path, processor):
    data = datasets.Dataset.from_list(rows())
    losses = []
    for precompute in (True, False):
        trainer = DPOTrainer(
            model=vlm(processor),
            args=config(tmp_path, precompute_ref_log_probs=precompute, max_steps=2, seed=3),
            train_dataset=data,
            processing_class=processor,
        )
        trainer.train()
        losses.append([(h["loss"], h["rewards/margins"]) for h in trainer.state.log_history if "loss" in h])
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), **TOL)


def test_lora_trains_only_the_adapter_on_the_language_model(tmp_path, processor):
    from peft import LoraConfig

    model = vlm(processor)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=model,
        args=config(tmp_path, max_steps=2),
        train_dataset=datasets.Dataset.from_list(rows()),
        processing_class=processor,
        peft_config=peft_config,
    )
    trainer.train()
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and "language_model" in n for n in trained)
    for name, param in trainer.model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(param.detach(), before[name.replace(".base_layer", "")]), name


def test_a_custom_data_collator_is_honoured(tmp_path, processor):
    calls = []

    class Counting(DataCollatorForVisionPreference):
        def __call__(self, features):
            calls.append(len(features))
            return super().__call__(features)

    collator = Counting(processor.tokenizer.pad_token_id, processor=processor)
    trainer = DPOTrainer(
        model=vlm(processor),
        args=config(tmp_path),
        train_dataset=datasets.Dataset.from_list(rows()),
        processing_class=processor,
        data_collator=collator,
    )
    trainer.train()
    assert trainer.data_collator is collator and calls


def test_export_reloads_with_the_auto_classes_and_generates(tmp_path, processor):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pipeline.publish.export import export_model

    trainer = DPOTrainer(
        model=vlm(processor),
        args=config(tmp_path),
        train_dataset=datasets.Dataset.from_list(rows()),
        processing_class=processor,
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "model"))
    export_model(tmp_path / "model", tmp_path / "export")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "export")
    loaded = AutoProcessor.from_pretrained(tmp_path / "export")
    row = rows(1, seed=5)[0]
    text = loaded.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    inputs = loaded(text=[text], images=row["images"], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    torch.testing.assert_close(model(**inputs).logits, trainer.model.eval()(**inputs).logits, **TOL)


# ---- refusals ------------------------------------------------------------------------------------------


def test_max_length_that_cuts_image_tokens_is_refused_with_the_advice(tmp_path, processor):
    with pytest.raises(PipelineError, match=r"rule image_truncated.*max_length") as err:
        DPOTrainer(
            model=vlm(processor),
            args=config(tmp_path, max_length=8),
            train_dataset=datasets.Dataset.from_list(rows()),
            processing_class=processor,
        )
    assert "None" in str(err.value) or "null" in str(err.value)


def test_vision_data_with_a_text_model_or_keep_end_or_a_tokenizer_is_refused(
    tmp_path, processor, tiny_model, tiny_tokenizer
):
    with pytest.raises(PipelineError, match="text-only"):
        DPOTrainer(
            model=tiny_model,
            args=config(tmp_path),
            train_dataset=datasets.Dataset.from_list(rows()),
            processing_class=tiny_tokenizer,
        )
    with pytest.raises(PipelineError, match="not the model's processor"):
        DPOTrainer(
            model=vlm(processor),
            args=config(tmp_path),
            train_dataset=datasets.Dataset.from_list(rows()),
            processing_class=processor.tokenizer,
        )
    with pytest.raises(PipelineError, match="keep_end"):
        DPOTrainer(
            model=vlm(processor),
            args=config(tmp_path, truncation_mode="keep_end"),
            train_dataset=datasets.Dataset.from_list(rows()),
            processing_class=processor,
        )


def image_row(images=None, prompt_parts=1, **extra) -> dict:
    content = [{"type": "image"}] * prompt_parts + [{"type": "text", "text": "what colour ?"}]
    row = {
        "prompt": [{"role": "user", "content": content}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "blue"}]}],
    }
    if images is not None:
        row["images"] = images
    row.update(extra)
    return row


@pytest.mark.parametrize(
    "row, rule",
    [
        (image_row([b"not an image"]), "bad_image"),
        (image_row(["missing.png"]), "bad_image"),
        (image_row([png()], image=png()), "bad_image"),
        (image_row([png(), png()]), "image_count_mismatch"),
        (image_row([], prompt_parts=1), "image_count_mismatch"),
        (image_row([png()], prompt_parts=0), "image_count_mismatch"),
        (
            {
                **image_row([png()]),
                "chosen": [{"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "red"}]}],
            },
            "image_count_mismatch",
        ),
        ({"prompt": "what colour ?", "chosen": " red", "rejected": " blue", "images": [png()]}, "images_on_text"),
        ({**image_row([png()]), "prompt": [{"role": "user", "content": [{"type": "video"}]}]}, "non_string_content"),
    ],
    ids=[
        "undecodable",
        "missing_file",
        "image_and_images",
        "too_many_images",
        "no_images",
        "no_placeholder",
        "image_in_completion",
        "text_row",
        "unknown_part",
    ],
)
def test_every_vision_rule_refuses_its_row(tmp_path, row, rule):
    with pytest.raises(InvalidRow) as err:
        canonical_pair(row, image_files=ImageFiles(base=tmp_path))
    assert err.value.rule == rule


def test_images_are_stored_as_bytes_from_every_kind_of_value(tmp_path):
    from pipeline.data.images import open_image, row_images

    data = png((0, 255, 0))
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(data)
    values = [
        data,
        "pics/a.png",
        {"bytes": data, "path": None},
        {"bytes": None, "path": str(tmp_path / "pics/a.png")},
        Image.open(io.BytesIO(data)),
    ]
    stored = row_images({"images": values}, ImageFiles(base=tmp_path, inside=(tmp_path.resolve(),)))
    assert [s["format"] for s in stored] == ["png"] * 5
    assert all(s["bytes"] == data for s in stored[:4])  # files and bytes are kept as they are
    assert all(open_image(s).getpixel((0, 0))[:3] == (0, 255, 0) for s in stored)


def test_row_ids_cover_the_image_bytes():
    from pipeline.data.normalize import canonical_record

    a = canonical_record(canonical_pair(image_row([png((255, 0, 0))])))
    b = canonical_record(canonical_pair(image_row([png((0, 0, 255))])))
    assert a["row_id"] != b["row_id"] and json.loads(a["prompt"]) == json.loads(b["prompt"])


def test_drop_skips_invalid_vision_rows_and_logs_them(tmp_path, processor, caplog):
    good = rows(4)
    bad = [{**good[0], "images": []}, {**good[1], "images": good[1]["images"] * 2}]
    data = datasets.Dataset.from_list(good + bad)
    with caplog.at_level(logging.WARNING):
        trainer = DPOTrainer(
            model=vlm(processor),
            args=config(tmp_path, on_invalid="drop"),
            train_dataset=data,
            processing_class=processor,
        )
    assert len(trainer.train_dataset) == 4
    assert "row 4: " in caplog.text and "row 5: " in caplog.text and "image_count_mismatch" in caplog.text


def test_a_trainer_built_without_data_evaluates_images_as_the_training_one(tmp_path, processor):
    """The evaluate stage builds its trainer with no dataset and predicts later: the batches still carry pixels."""
    model = vlm(processor).eval()
    data = datasets.Dataset.from_list(rows(6, seed=4))
    with_data = DPOTrainer(
        model=model, args=config(tmp_path), train_dataset=data, eval_dataset=data, processing_class=processor
    )
    want = with_data.evaluate()
    without = DPOScorer(model=model, args=config(tmp_path), processing_class=processor)
    assert isinstance(without.data_collator, DataCollatorForVisionPreference)
    got = without.evaluate(with_data.eval_dataset)
    for name in ("eval_loss", "eval_logps/chosen", "eval_logps/rejected", "eval_rewards/accuracies"):
        assert got[name] == pytest.approx(want[name], abs=1e-5), name


def test_normalize_reads_datasets_image_features_and_parquet_image_structs(tmp_path):
    """A save_to_disk dataset with an Image feature (one `image` per row) and a Parquet file of {bytes, path}
    structs normalize to the same stored images, and the row ids cover them."""
    import pyarrow.parquet as pq

    import stages.normalize as normalize_stage
    from pipeline.config.params import check_params

    pairs = rows(6, seed=7)
    single = [{**{k: v for k, v in r.items() if k != "images"}, "image": r["images"][0]} for r in pairs]
    datasets.Dataset.from_list(single).cast_column("image", datasets.Image()).save_to_disk(tmp_path / "disk")
    datasets.Dataset.from_list(single).cast_column("image", datasets.Image()).to_parquet(tmp_path / "pairs.parquet")
    stored = []
    for source in (tmp_path / "disk", tmp_path / "pairs.parquet"):
        params = check_params({"data": {"train": str(source), "eval_fraction": 0.5}})
        out = tmp_path / f"normalized-{source.name}"
        report = normalize_stage.run(params, out)
        assert sum(report["rows_written"].values()) == 6 and report["rows_dropped"] == 0
        records = [r for split in ("train", "eval") for r in pq.read_table(out / f"{split}.parquet").to_pylist()]
        stored.append(sorted((r["row_id"], r["images"][0]["bytes"]) for r in records))
    assert stored[0] == stored[1]
    assert all(data.startswith(b"\x89PNG") for _, data in stored[0])


def test_the_reference_example_runs_from_a_model_path_alone(tmp_path, processor):
    """DPOTrainer(model=<VLM directory>, args=DPOConfig(max_length=None), train_dataset=<images>): the model loads
    with AutoModelForImageTextToText and its processor with AutoProcessor."""
    vlm(processor).save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    trainer = DPOTrainer(
        model=str(tmp_path / "vlm"), args=config(tmp_path), train_dataset=datasets.Dataset.from_list(rows())
    )
    assert type(trainer.processing_class).__name__ == "LlavaProcessor"
    assert type(trainer.model).__name__ == "LlavaForConditionalGeneration"
    trainer.train()
    assert "rewards/accuracies" in trainer.state.log_history[0]
