"""Held-out evaluation: the DPO metrics of the policy and of the reference on the eval pairs; the answers of both to
held-out prompts, judged into a win rate with its confidence interval and length control (`pipeline.judge`); and
the lm-evaluation-harness tasks of evaluate.lm_eval on both, side by side."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config.train_params import dpo_config
from pipeline.core.distributed import barrier, gather_shares, is_main, my_share
from pipeline.data.images import data_uri
from pipeline.data.processing import tokenizer_of
from pipeline.data.schema import decoded_row
from pipeline.data.tables import load_pairs
from pipeline.judge.harness import check_tasks, run_harness
from pipeline.judge.judges import Comparison, check_judge, judge_kind, judge_source, judged, load_judge
from pipeline.judge.results import FIGURES, examples_of, figures, lengths_of
from pipeline.judge.sampling import Sampling, evaluation_prompts, generate_answers
from pipeline.model.loading import load_base_tokenizer, load_policy, load_trained_policy
from pipeline.model.logps import sequence_logps
from pipeline.objective.reference import Reference, stage_reference
from pipeline.run.trainer import DPOScorer
from pipeline.store.dvc_deps import require_dvc_deps


def answer_pairs(
    policy, reference: Reference, processing_class, prompts: list[dict], sampling: Sampling
) -> list[Comparison]:
    """The policy's and the reference's answers to each prompt, paired sample by sample (`sampling.num_samples`
    comparisons per prompt), in the prompts' order. Each process answers its share of the prompts; the reference
    generates inside its context (for "adapter_off": the policy with its adapter switched off)."""
    share = my_share(prompts)
    mine = gather_shares(generate_answers(policy, processing_class, share, sampling), len(prompts))
    with reference.context():
        theirs = generate_answers(reference.model, processing_class, share, sampling)
    theirs = gather_shares(theirs, len(prompts))
    return [
        Comparison(prompt, a, b, i)
        for i, (prompt, policy_answers, reference_answers) in enumerate(zip(prompts, mine, theirs))
        for a, b in zip(policy_answers, reference_answers)
    ]


def judged_generations(params: dict, comparisons: list[Comparison], judge, processing_class) -> dict:
    """The generations of evaluate: `{"judge", "num_generations", "num_samples_per_prompt", "examples", figures}`
    (the figures of `pipeline.judge.results`; `judge` is the resolved evaluate.judge)."""
    cfg = params["evaluate"]
    verdicts = judged(judge, comparisons) if judge is not None else None
    examples = examples_of(comparisons, verdicts, lengths_of(comparisons, processing_class))
    for example in examples:
        if example.get("images"):
            example["images"] = [data_uri(i) for i in example["images"]]
    return {
        "judge": judge_kind(params),
        "num_generations": len({c.group for c in comparisons}),
        "num_samples_per_prompt": cfg["num_samples_per_prompt"],
        "confidence": cfg["confidence"],
        **figures(examples, cfg["bootstrap_resamples"], cfg["confidence"], params["seed"]),
        "examples": examples,
    }


def as_text(value) -> str:
    """A prompt or completion as plain text: a string as is, messages as `role: content` lines."""
    if isinstance(value, str):
        return value
    return "\n".join(f"{m.get('role', '?')}: {_content(m.get('content'))}" for m in value or [])


def _content(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("text", "image") for p in content):
        return " ".join("[image]" if p["type"] == "image" else p.get("text", "") for p in content)
    return json.dumps(content)


def pair_texts(normalized: Path, row_ids: list[str]) -> dict[str, dict[str, str]]:
    """row_id → {prompt, chosen, rejected} as text, from the normalized eval split."""
    wanted = set(row_ids)
    texts = {}
    for record in pq.read_table(Path(normalized) / "eval.parquet").to_pylist():
        if record["row_id"] in wanted:
            row = decoded_row(record)
            texts[row["row_id"]] = {k: as_text(row[k]) for k in ("prompt", "chosen", "rejected")}
    return texts


@dataclasses.dataclass
class Evaluation:
    """What evaluate found: the policy's metrics (flat names, with the counts `num_pairs` and `num_generations`),
    the reference's own DPO metrics on the same pairs (`EvalScorer.score_reference`), the generations (None when
    evaluate.num_generations is 0: `judged_generations`), every eval pair with its text and rewards, and the judge
    (`{"judge": kind}`, with its model's source record for a reward model or pairwise judge)."""

    metrics: dict[str, float]
    reference_metrics: dict[str, float]
    generations: dict | None
    pairs: list[dict]
    judge: dict = dataclasses.field(default_factory=dict)


class EvalScorer(DPOScorer):
    """The evaluate stage's scorer: `predict` scores the policy against the reference, `score_reference` the
    reference against itself."""

    _scoring_reference = False

    def score_reference(self, dataset) -> dict[str, float]:
        """The reference's own eval metrics on `dataset`, under the names and arithmetic of the policy's.

        One forward of the reference per batch (as the trainer runs an online reference: its context, its device),
        with the diagnostics, stands in for the policy's; its log-probs serve as both sides of the objective. So
        logps/*, logits/*, entropy and mean_token_accuracy are the reference's; its implicit rewards
        β·log(π_ref/π_ref) are exactly 0, so rewards/accuracies (chosen reward strictly above rejected) is 0, and
        loss is the objective at zero rewards (log 2 for sigmoid). The stored log-probs alone would leave entropy,
        token accuracy and logits unmeasured, and the one forward gives all of them. With Liger the pass takes the
        plain route, so the reference also gets the entropy and token accuracy the fused loss does not compute."""
        liger = self.args.use_liger_kernel
        self._scoring_reference, self.args.use_liger_kernel = True, False
        try:
            loss = self.predict(dataset, metric_key_prefix="eval").metrics["eval_loss"]
        finally:
            self._scoring_reference, self.args.use_liger_kernel = False, liger
        return {"loss": loss, **self.pop_metrics("eval")}

    def _token_values(self, model, inputs: dict, diagnostics: bool):
        if not self._scoring_reference:
            return super()._token_values(model, inputs, diagnostics)
        with self.reference.context():
            per_token, diag = super()._token_values(self.reference.model, inputs, diagnostics)
        self._reference_per_token = per_token
        return per_token, diag

    def _reference_sequence_logps(self, inputs: dict, mask: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        if not self._scoring_reference:
            return super()._reference_sequence_logps(inputs, mask, shared)
        return sequence_logps(self._reference_per_token, mask, self.args.ld_alpha, shared)


def harness_results(model, processing_class, params: dict) -> dict:
    """evaluate.lm_eval's tasks run on `model` (flat `task/metric` names)."""
    cfg = params["evaluate"]["lm_eval"]
    results = run_harness(
        model,
        tokenizer_of(processing_class),
        cfg["tasks"],
        cfg["include_path"],
        cfg["limit"],
        cfg["num_fewshot"],
        params["evaluate"]["batch_size"],
        params["seed"],
    )
    return {
        f"{task}/{name}": value for task, row in results.items() for name, value in row.items() if value is not None
    }


def check_evaluation(params: dict, normalized: Path) -> tuple[dict | None, list[dict]]:
    """What evaluate reads besides the artifacts, checked before any model is loaded: the judge (its source record,
    None without a judge model), the lm-evaluation-harness tasks, and the held-out prompts (returned)."""
    source = judge_source(params)
    check_judge(params, source)
    harness = params["evaluate"]["lm_eval"]
    if harness["tasks"]:
        if harness["include_path"]:
            require_dvc_deps(
                [("evaluate.lm_eval.include_path", harness["include_path"], [Path(harness["include_path"])])]
            )
        check_tasks(harness["tasks"], harness["include_path"])
    return source, evaluation_prompts(params, normalized)


def versus_figures(
    params: dict, comparisons: list[Comparison], versus: Path, judge, processing_class, device, out_dir: Path
) -> dict:
    """The policy's answers judged against those of another model (the policy `versus`, a base artifact, starts
    from), written with the same sampling: its figures under `versus/`, its examples in generations_versus.jsonl."""
    model = load_policy(versus, params, trainable=False).to(device)
    prompts = {c.group: c.prompt for c in comparisons}
    groups = sorted(prompts)
    share = my_share([prompts[g] for g in groups])
    theirs = gather_shares(generate_answers(model, processing_class, share, Sampling.of_params(params)), len(groups))
    del model
    by_group: dict[int, list[str]] = {g: list(answers) for g, answers in zip(groups, theirs)}
    against = [Comparison(c.prompt, c.policy, by_group[c.group].pop(0), c.group) for c in comparisons]
    generated = judged_generations(params, against, judge, processing_class)
    if is_main():
        lines = "".join(json.dumps(e) + "\n" for e in generated["examples"])
        (Path(out_dir) / "generations_versus.jsonl").write_text(lines)
    return {f"versus/{k}": v for k, v in generated.items() if k in FIGURES}


def evaluate_policy(
    params: dict,
    train: Path,
    tokenized: Path,
    ref_logps: Path,
    normalized: Path,
    base: Path,
    out_dir: Path,
    versus: Path | None = None,
) -> Evaluation:
    """The DPO metrics of the trained policy on the eval split against the run's reference, and the reference's own;
    per-example results (with the pairs' text) in out_dir; the answers of both to held-out prompts in
    out_dir/generations.jsonl (unless evaluate.num_generations is 0), judged by evaluate.judge; the
    lm-evaluation-harness tasks of evaluate.lm_eval on both; with `versus` (a base artifact), the policy's answers
    also judged against that model's (`versus_figures`)."""
    cfg = params["evaluate"]
    source, prompts = check_evaluation(params, normalized)
    precomputed = bool(params["train"].get("precompute_ref_log_probs", False))
    eval_set = load_pairs(tokenized, "eval", ref_logps if precomputed else None)
    tokenizer = load_base_tokenizer(base, params)
    policy = load_trained_policy(Path(train) / "model", base, params)  # a full model, or the adapter on the base
    # the training run's reference (a new adapter's: the adapter off): its own metrics and generations run it
    reference = stage_reference(base, params, policy, "after_training")
    args = dpo_config(
        params,
        Path(out_dir) / "trainer",
        per_device_eval_batch_size=cfg["batch_size"],
        eval_strategy="no",
        gradient_checkpointing=False,
    )
    trainer = EvalScorer(model=policy, ref_model=reference, args=args, processing_class=tokenizer)
    eval_set = trainer.with_reference_logps(eval_set)  # computed once, when not precomputed
    prediction = trainer.predict(eval_set, metric_key_prefix="eval")
    metrics = {"loss": prediction.metrics["eval_loss"], **trainer.pop_metrics("eval"), "num_pairs": len(eval_set)}
    reference_metrics = trainer.score_reference(eval_set)
    rewards = prediction.predictions
    row_ids = list(eval_set["row_id"])
    texts = pair_texts(normalized, row_ids)
    pairs = [
        {
            "row_id": row_id,
            **texts.get(row_id, {"prompt": "", "chosen": "", "rejected": ""}),
            "chosen_reward": float(c),
            "rejected_reward": float(r),
            "margin": float(c - r),
        }
        for row_id, c, r in zip(row_ids, rewards[:, 0], rewards[:, 1])
    ]
    per_example = pa.Table.from_pylist([{**p, "correct": p["chosen_reward"] > p["rejected_reward"]} for p in pairs])
    if is_main():
        pq.write_table(per_example, Path(out_dir) / "per_example.parquet")
    if reference.standalone is not None:
        reference.standalone.to(trainer.model.device)
    generated = None
    if prompts:
        comparisons = answer_pairs(trainer.model, reference, tokenizer, prompts, Sampling.of_params(params))
        judge = load_judge(params, source, trainer.model.device)
        generated = judged_generations(params, comparisons, judge, tokenizer)
        if versus is not None and judge is not None:
            metrics.update(versus_figures(params, comparisons, versus, judge, tokenizer, trainer.model.device, out_dir))
        del judge
        metrics["num_generations"] = generated["num_generations"]
        metrics.update({k: v for k, v in generated.items() if k in FIGURES})
        if is_main():
            lines = "".join(json.dumps(e) + "\n" for e in generated["examples"])
            (Path(out_dir) / "generations.jsonl").write_text(lines)
    harness = None
    if cfg["lm_eval"]["tasks"] and is_main():  # one process runs the harness on a model it did not load
        harness = {"policy": harness_results(trainer.model, tokenizer, params)}
        with reference.context():
            harness["reference"] = harness_results(reference.model, tokenizer, params)
        metrics.update({f"lm_eval/{side}/{name}": v for side, row in harness.items() for name, v in row.items()})
    barrier()
    if is_main():
        shutil.rmtree(Path(out_dir) / "trainer", ignore_errors=True)
    return Evaluation(metrics, reference_metrics, generated, pairs, {"judge": judge_kind(params), **(source or {})})
