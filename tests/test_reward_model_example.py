"""examples/train_reward_model.py: a tiny reward model learns the built-in task's preference, and its saved directory
reloads with the Auto classes (as the evaluate stage's reward_model judge loads it) and scores the same."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_reward_model.py"
TINY = {"pairs": 256, "steps": 40, "batch_size": 16, "learning_rate": 3e-3, "seed": 0}
TINY_SHAPE = {"eval_pairs": 128, "hidden_size": 32, "num_layers": 1, "num_heads": 2}


def load_example():
    spec = importlib.util.spec_from_file_location("train_reward_model", SCRIPT)  # examples/ is not a package
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return load_example()


@pytest.fixture(scope="module")
def trained(example, tmp_path_factory):
    """One tiny training run (a few seconds): the output directory and the returned report."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only fight over a busy CPU (several times slower)
    try:
        out = tmp_path_factory.mktemp("reward_model")
        return out, example.train_reward_model(out, **TINY, **TINY_SHAPE)
    finally:
        torch.set_num_threads(threads)


def test_learns_the_preference_on_held_out_prompts(trained):
    out, report = trained
    assert report["heldout_accuracy"] >= 0.9, report
    assert report["heldout_margin"] > 0, report
    assert report["judge_agreement"] >= 0.95, report  # fresh answers, some about another subject, vs task.judge
    assert report["heldout_pairs"] == TINY_SHAPE["eval_pairs"]
    assert report["settings"] == {**TINY, **TINY_SHAPE, "eval_fraction": 0.1}
    assert json.loads((out / "reward_model.json").read_text()) == report


def test_saved_directory_reloads_and_scores_the_same(example, trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.builtin.tokenizer import build_tokenizer

    out, report = trained
    assert (out / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]

    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    assert tokenizer.chat_template == build_tokenizer().chat_template

    _, heldout, _ = example.task_pairs(TINY["pairs"], TINY_SHAPE["eval_pairs"], TINY["seed"], 0.1)
    chosen, rejected = example.pair_rewards(model, tokenizer, heldout, batch_size=64)
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(heldout) == report["heldout_accuracy"]
    assert sum(c - r for c, r in zip(chosen, rejected)) / len(heldout) == pytest.approx(report["heldout_margin"])


def test_score_pools_at_the_last_answer_token_whatever_the_padding(example, trained):
    """Right padding: each reward is read at the sequence's own last token, so batching (padding) changes nothing;
    and the rendered input is the prompt plus the answer as an assistant message in the chat template."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, _ = trained
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    _, heldout, _ = example.task_pairs(TINY["pairs"], 8, TINY["seed"], 0.1)
    prompts = [p["prompt"] for p in heldout] * 2
    answers = [p["chosen"][0]["content"] for p in heldout] + [p["rejected"][0]["content"] for p in heldout]
    assert len({len(example.encode(tokenizer, p, a)) for p, a in zip(prompts, answers)}) > 1  # padding happens
    batched = example.score(model, tokenizer, prompts, answers, batch_size=16)
    one_by_one = example.score(model, tokenizer, prompts, answers, batch_size=1)
    assert batched == pytest.approx(one_by_one, abs=1e-5)

    text = example.render(tokenizer, prompts[0], answers[0])
    assert text.startswith("<s><|system|>") and text.endswith(f"<|assistant|> {answers[0]} <|end|> ")
