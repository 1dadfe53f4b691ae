"""Shared fixtures: tiny params for the built-in task, and a tiny model + tokenizer."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISABLE_TQDM", "1")


def random_pairs(n: int = 4, seed: int = 0, prompt=(2, 6), chosen=(2, 7), rejected=(2, 7), low: int = 5) -> list[dict]:
    """`n` tokenized pairs of random ids in [low, 100), with lengths drawn from the given (min, max) ranges."""
    import random

    rng = random.Random(seed)

    def ids(k):
        return [rng.randrange(low, 100) for _ in range(k)]

    return [
        {
            "row_id": str(i),
            "prompt_ids": ids(rng.randint(*prompt)),
            "chosen_ids": ids(rng.randint(*chosen)),
            "rejected_ids": ids(rng.randint(*rejected)),
        }
        for i in range(n)
    ]


def tiny_params(**train_overrides) -> dict:
    """params for the built-in task at test size: a few seconds per stage on 2 CPU cores."""
    from pipeline.config.params import check_params

    train = {
        "precompute_ref_log_probs": True,
        "learning_rate": 1e-4,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "gradient_checkpointing": False,
        "logging_steps": 2,
        "save_strategy": "no",
        "disable_tqdm": True,
    }
    train.update(train_overrides)
    return check_params(
        {
            "model": {
                "builtin": {
                    "hidden_size": 32,
                    "num_layers": 1,
                    "num_heads": 2,
                    "warmup_steps": 20,
                    "warmup_batch_size": 16,
                }
            },
            "data": {"builtin": {"num_pairs": 48, "num_eval_pairs": 16}},
            "tokenize": {"max_length": 64},
            "ref_logps": {"precompute_ref_batch_size": 16},
            "train": train,
            "evaluate": {"batch_size": 16, "num_generations": 8, "max_new_tokens": 12},
        }
    )


def prepare_stages(params: dict, root, through: str = "tokenize") -> None:
    """Run base, normalize, tokenize (and ref-logps with through="ref-logps") into root/<artifact>."""
    import stages.base as base_stage
    import stages.normalize as normalize_stage
    import stages.ref_logps as ref_stage
    import stages.tokenize as tokenize_stage

    base_stage.run(params, root / "base")
    normalize_stage.run(params, root / "normalized")
    tokenize_stage.run(params, root / "normalized", root / "base", root / "tokenized")
    if through == "ref-logps":
        ref_stage.run(params, root / "tokenized", root / "base", root / "ref_logps")


@pytest.fixture
def params():
    return tiny_params()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from pipeline.builtin.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    from pipeline.builtin.model import build_model

    return build_model(tiny_tokenizer, seed=0, hidden_size=32, num_layers=1, num_heads=2)


def write_builtin_model(path) -> None:
    """The tiny built-in model and its tokenizer saved as a local model directory (as a user's own model is)."""
    from pipeline.builtin.model import build_model
    from pipeline.builtin.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    build_model(tokenizer, seed=0, hidden_size=32, num_layers=1, num_heads=2).save_pretrained(path)
    tokenizer.save_pretrained(path)


def reference_logps(reference, rows: list[dict], collator, batch_size: int) -> dict[str, list]:
    """Summed and per-token completion log-probs of chosen and rejected for a few in-memory `rows` (`row_id`,
    `prompt_ids`, `chosen_ids`, `rejected_ids`), as Python lists in their order: one block of the reference pass."""
    import pyarrow as pa

    from pipeline.run.reference_pass import ID_COLUMNS, score_block

    block = pa.Table.from_pydict({name: [list(r[name]) for r in rows] for name in ID_COLUMNS})
    return {"row_id": [r["row_id"] for r in rows], **score_block(reference, block, collator, batch_size).to_pydict()}
