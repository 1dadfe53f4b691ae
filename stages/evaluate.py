"""dpo evaluate: DPO metrics on the held-out pairs (+ judged win rate on the built-in task)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import manifest_digest, read_manifest, staged_dir, write_json, write_manifest
from pipeline.base import adapter_source, load_base_tokenizer, load_reference, load_trained_policy, reference_source
from pipeline.data.schema import decoded_row
from pipeline.data.sources import is_builtin
from pipeline.data.tables import load_pairs
from pipeline.evaluation import judged_win_rate
from pipeline.models import is_peft_model
from pipeline.trainer import DPOTrainer

from . import paths
from .common import load, params_option, path_option, user_errors
from .train import training_config


def held_out_prompts(normalized: Path, limit: int) -> list[list[dict]]:
    """Distinct conversational prompts of the eval split, in file order, at most `limit`."""
    seen, prompts = set(), []
    for record in pq.read_table(Path(normalized) / "eval.parquet").to_pylist():
        if record["conversational"] and record["prompt"] not in seen and len(prompts) < limit:
            seen.add(record["prompt"])
            prompts.append(decoded_row(record)["prompt"])
    return prompts


def run(params: dict, train: Path = paths.TRAIN, tokenized: Path = paths.TOKENIZED, ref_logps: Path = paths.REF_LOGPS,
        normalized: Path = paths.NORMALIZED, base: Path = paths.BASE, out: Path = paths.EVAL,
        metrics_path: Path = paths.METRICS) -> dict:
    read_manifest(train, "train")
    cfg = params["evaluate"]
    precomputed = params["train"].get("precompute_ref_log_probs", False)
    eval_set = load_pairs(tokenized, "eval", ref_logps if precomputed else None)
    tokenizer = load_base_tokenizer(base, params)
    judge = is_builtin(params["data"]["train"])
    policy = load_trained_policy(train / "model", base, params)  # a full model, or the adapter on the base
    # the training run's reference: a new adapter's is the policy with the adapter off (no second base);
    # otherwise the explicit model, the starting adapter or the base, loaded only when something runs it
    adapter_off = is_peft_model(policy) and reference_source(base) is None and adapter_source(base) is None
    reference = None if adapter_off or (precomputed and not judge) else load_reference(base, params)
    with staged_dir(out) as tmp:
        args = training_config(params, tmp / "trainer", per_device_eval_batch_size=cfg["batch_size"],
                               eval_strategy="no", gradient_checkpointing=False)
        trainer = DPOTrainer(model=policy, ref_model=None if precomputed else reference, args=args,
                             processing_class=tokenizer)
        if adapter_off:
            trainer.use_policy_without_adapter_as_reference()
        prediction = trainer.predict(eval_set, metric_key_prefix="eval")
        metrics = {"loss": prediction.metrics["eval_loss"], **trainer.pop_metrics("eval"), "num_pairs": len(eval_set)}
        rewards = prediction.predictions
        per_example = pa.table({"row_id": eval_set["row_id"], "chosen_reward": rewards[:, 0], "rejected_reward": rewards[:, 1],
                                "margin": rewards[:, 0] - rewards[:, 1], "correct": rewards[:, 0] > rewards[:, 1]})
        pq.write_table(per_example, tmp / "per_example.parquet")
        if judge:
            prompts = held_out_prompts(normalized, cfg["num_generations"])
            judged = judged_win_rate(trainer.model, trainer.model if adapter_off else reference.to(trainer.model.device),
                                     tokenizer, prompts, cfg["max_new_tokens"], cfg["batch_size"],
                                     reference_context=trainer.reference_context)
            metrics.update({k: judged[k] for k in ("win_rate", "policy_mean_score", "reference_mean_score")})
            metrics["num_generations"] = len(prompts)
            (tmp / "generations.jsonl").write_text("".join(json.dumps(e) + "\n" for e in judged["examples"]))
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        write_json(tmp / "metrics.json", metrics)
        inputs = {"train": manifest_digest(train), "tokenized": manifest_digest(tokenized), "base": manifest_digest(base)}
        write_manifest(tmp, "evaluate", inputs=inputs, params={"evaluate": cfg, "train": params["train"]},
                       rows={"eval": len(eval_set)})
    write_json(metrics_path, metrics)
    return metrics


@click.command("evaluate")
@params_option
@path_option("train", paths.TRAIN, "The trained model artifact.")
@path_option("tokenized", paths.TOKENIZED, "The tokenized artifact (eval split).")
@path_option("ref-logps", paths.REF_LOGPS, "The reference log-probs.")
@path_option("normalized", paths.NORMALIZED, "The normalized artifact (held-out prompts for generation).")
@path_option("base", paths.BASE, "The base artifact: the reference for generation.")
@path_option("out", paths.EVAL, "Where to write per-example results.")
@path_option("metrics", paths.METRICS, "Where to write the metrics JSON.")
@user_errors
def command(params_path: Path, train: Path, tokenized: Path, ref_logps: Path, normalized: Path, base: Path, out: Path, metrics: Path) -> None:
    """Evaluate the trained policy on the eval split: DPO metrics, and the judged win rate on the built-in task."""
    result = run(load(params_path), train, tokenized, ref_logps, normalized, base, out, metrics)
    click.echo(json.dumps(result, indent=1))
