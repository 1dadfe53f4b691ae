"""The staged pipeline on the built-in vision default (builtin:tiny-llava on builtin:vision-colors) at test size:
every stage runs, images travel as bytes to batch time, a max_length that cuts image tokens is refused by
tokenize, the reference is the same precomputed or online, LoRA trains the language model only, and the export
reloads with the Auto classes and generates."""

from __future__ import annotations

import copy

import pyarrow.parquet as pq
import pytest
import torch

import stages.tokenize as tokenize_stage
from pipeline.config.params import check_params
from pipeline.core.errors import PipelineError
from pipeline.publish.metrics_file import read_metrics
from test_pipeline_e2e import METRIC_NAMES, run_all


def vision_params(**train) -> dict:
    options = {
        "precompute_ref_log_probs": True,
        "learning_rate": 1e-3,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "gradient_checkpointing": False,
        "logging_steps": 2,
        "save_strategy": "no",
        "disable_tqdm": True,
        **train,
    }
    return check_params(
        {
            "model": {
                "name_or_path": "builtin:tiny-llava",
                "builtin": {
                    "hidden_size": 32,
                    "num_layers": 1,
                    "num_heads": 2,
                    "warmup_steps": 10,
                    "warmup_batch_size": 8,
                },
            },
            "data": {"train": "builtin:vision-colors", "builtin": {"num_pairs": 32, "num_eval_pairs": 8}},
            "tokenize": {"max_length": None},
            "ref_logps": {"precompute_ref_batch_size": 8},
            "train": options,
            "evaluate": {"batch_size": 8, "num_generations": 4, "max_new_tokens": 8},
        }
    )


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    params = vision_params()
    return params, run_all(params, tmp_path_factory.mktemp("vision"))


def test_every_stage_runs_and_images_travel_as_bytes(vision_run):
    params, p = vision_run
    normalized = pq.read_table(p["normalized"] / "train.parquet")
    tokenized = pq.read_table(p["tokenized"] / "train.parquet")
    assert normalized.num_rows == tokenized.num_rows == 32
    image = tokenized.column("images")[0].as_py()[0]
    assert image["format"] == "png" and image["bytes"].startswith(b"\x89PNG")
    assert "pixel_values" not in tokenized.column_names  # pixels are made at batch time, not stored
    metrics = read_metrics(p["metrics"])
    assert METRIC_NAMES <= set(metrics) and {"win_rate", "num_generations"} <= set(metrics)
    assert (p["export"] / "preprocessor_config.json").exists() or (p["export"] / "processor_config.json").exists()


def test_the_export_reloads_with_the_auto_classes_and_generates(vision_run):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pipeline.builtin import vision_task

    _, p = vision_run
    model = AutoModelForImageTextToText.from_pretrained(p["export"])
    processor = AutoProcessor.from_pretrained(p["export"])
    row = vision_task.preference_pairs(1, seed=11)[0]
    text = processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=row["images"], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_tokenize_refuses_a_max_length_that_cuts_image_tokens(vision_run, tmp_path):
    params, p = vision_run
    params = copy.deepcopy(params)
    params["tokenize"]["max_length"] = 12  # inside the 16 image tokens of the prompt
    with pytest.raises(
        PipelineError, match=r"row 0 .*max_length=12 would cut .* image tokens.*null.*\[rule image_truncated\]"
    ):
        tokenize_stage.run(check_params(params), p["normalized"], p["base"], tmp_path / "tokenized")
    assert not (tmp_path / "tokenized").exists()


def test_a_text_model_is_refused_on_vision_data(vision_run, tmp_path):
    import stages.base as base_stage
    from conftest import tiny_params

    params, p = vision_run
    text_params = tiny_params()
    base_stage.run(text_params, tmp_path / "base")
    with pytest.raises(PipelineError, match="rows have images but the model's processing class is a tokenizer"):
        tokenize_stage.run(text_params, p["normalized"], tmp_path / "base", tmp_path / "tokenized")


def test_lora_through_the_stages_trains_the_language_model_and_exports_merged(vision_run, tmp_path):
    from transformers import AutoModelForImageTextToText

    import stages.export as export_stage
    import stages.train as train_stage

    params, p = vision_run
    params = copy.deepcopy(params)
    params["model"]["peft"].update({"enabled": True, "r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
    params = check_params(params)
    train_stage.run(
        params, p["tokenized"], p["ref_logps"], p["base"], tmp_path / "train", tmp_path / "ckpt", tmp_path / "live"
    )
    config = (tmp_path / "train" / "model" / "adapter_config.json").read_text()
    assert "language_model" in config and "vision_tower" not in config
    export_stage.run(params, tmp_path / "train", p["normalized"], p["base"], p["metrics"], tmp_path / "export")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "export")
    assert not any("lora_" in name for name, _ in model.named_parameters())
    base = AutoModelForImageTextToText.from_pretrained(p["base"] / "model")
    vision_same = all(
        torch.equal(a, b)
        for (n, a), (_, b) in zip(model.named_parameters(), base.named_parameters())
        if "vision_tower" in n
    )
    assert vision_same


def test_tokenize_with_worker_processes_writes_the_same_vision_artifact(vision_run, tmp_path):
    params, p = vision_run
    params = copy.deepcopy(params)
    params["tokenize"].update({"dataset_num_proc": 2, "batch_size": 8})
    tokenize_stage.run(check_params(params), p["normalized"], p["base"], tmp_path / "tokenized")
    for split in ("train", "eval"):
        assert pq.read_table(tmp_path / "tokenized" / f"{split}.parquet").equals(
            pq.read_table(p["tokenized"] / f"{split}.parquet")
        )


def test_the_report_shows_the_judged_prompts_pictures_inline(vision_run):
    _, p = vision_run
    report = p["report"].read_text()
    assert report.count('<img class="picture" alt="prompt image" src="data:image/png;base64,') == 4  # num_generations
