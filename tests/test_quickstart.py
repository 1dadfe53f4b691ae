"""The reference documentation's quick start, with a local model directory and a local dataset."""

from __future__ import annotations

import json


def test_quickstart_runs_unchanged_but_for_local_names(tmp_path, monkeypatch, tiny_model, tiny_tokenizer):
    model_dir = tmp_path / "tiny-model"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    data = tmp_path / "prefs.jsonl"
    rows = []
    for noun in ("movie", "book", "song", "meal"):
        question = [{"role": "user", "content": f"Tell me about the {noun} ."}]
        rows.append(
            {
                "chosen": question + [{"role": "assistant", "content": f"The {noun} was great and lovely ."}],
                "rejected": question + [{"role": "assistant", "content": f"The {noun} was awful and dull ."}],
            }
        )
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)

    from datasets import load_dataset

    from pipeline import DPOTrainer

    trainer = DPOTrainer(
        model=str(model_dir),
        train_dataset=load_dataset("json", data_files=str(data), split="train"),
    )
    trainer.train()

    assert trainer.args.output_dir == "tiny-model-DPO"
    assert trainer.state.global_step == 3  # 4 pairs, batch 8, 3 epochs (TrainingArguments defaults)
    first = trainer.train_dataset[0]
    prompt = tiny_tokenizer.decode(first["prompt_ids"])
    assert prompt.endswith("<|assistant|>") and "Tell me about the movie" in prompt
    assert tiny_tokenizer.decode(first["chosen_ids"]) == "The movie was great and lovely . <|end|>"
    trainer.save_model()
    assert (tmp_path / "tiny-model-DPO" / "config.json").exists()
