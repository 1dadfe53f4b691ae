"""`dpo judge-pairs`: a round's answers scored by a judge and paired into the canonical normalized schema.

The train split is the new pairs (`pipeline.judge.pairing`), with the original train pairs of the round's setting
(iterate.rounds.<k>.pairs: generated, original or both; original_pairs: how many); the eval split is the original
one, so every round is measured on the same held-out pairs.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from accelerate import PartialState

from pipeline.core.distributed import gather_shares, my_share
from pipeline.core.errors import PipelineError
from pipeline.data.normalize import canonical_record
from pipeline.data.schema import NORMALIZED_SCHEMA, decode_field
from pipeline.data.sources import is_builtin
from pipeline.judge.judges import check_judge, judge_source, load_judge
from pipeline.judge.pairing import DROP_REASONS, pairs_report, prompt_pairs
from pipeline.run.generation import SAMPLES_FILE


def pair_judge_params(params: dict) -> dict:
    """params with evaluate.judge set to judge_pairs.judge resolved (auto: builtin on the built-in task, else
    reward_model), so the judge is chosen, checked, recorded and loaded as evaluate's is."""
    kind = params["judge_pairs"]["judge"]
    if kind == "auto":
        kind = "builtin" if is_builtin(params["data"]["train"]) else "reward_model"
    if kind == "reward_model" and not params["evaluate"]["judge_model"]["name_or_path"]:
        raise PipelineError(
            "judge_pairs.judge: reward_model scores the answers with the sequence classifier of "
            "evaluate.judge_model.name_or_path, which is not set; set it (examples/train_reward_model.py trains one), "
            "or use judge_pairs.judge: builtin on the built-in task."
        )
    out = copy.deepcopy(params)
    out["evaluate"]["judge"] = kind
    return out


def answer_scores(judge, rows: list[dict]) -> list[float]:
    """The judge's score of every answer row (a built-in program's, or a reward model's), each process scoring its
    share."""
    mine = my_share(rows)
    prompts = [decode_field(r["prompt"], r["conversational"]) for r in mine]
    if judge.kind == "builtin":
        scores = [
            judge.score({"prompt": p, "images": r["images"]}, r["answer"]) for p, r in zip(prompts, mine, strict=True)
        ]
    else:
        scores = judge.scores(prompts, [r["answer"] for r in mine])
    return gather_shares(scores, len(rows))


def completion(answer: str, conversational: bool):
    return [{"role": "assistant", "content": answer}] if conversational else answer


def judged_pairs(rows: list[dict], scores: list[float], pairing: str, min_margin: float) -> tuple[list[dict], dict]:
    """The canonical records of the pairs among each prompt's answers, and the report (`pairs_report`)."""
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row["prompt_id"], []).append(i)
    records, dropped = [], []
    for indices in groups.values():
        indices.sort(key=lambda i: rows[i]["sample"])
        answers = [rows[i]["answer"] for i in indices]
        pairs, reason = prompt_pairs(answers, [scores[i] for i in indices], pairing, min_margin)
        dropped.append(reason)
        first = rows[indices[0]]
        conv = first["conversational"]
        for chosen, rejected in pairs:
            records.append(
                canonical_record(
                    {
                        "conversational": conv,
                        "prompt": decode_field(first["prompt"], conv),
                        "chosen": completion(answers[chosen], conv),
                        "rejected": completion(answers[rejected], conv),
                        "tools": decode_field(first["tools"], True),
                        "chat_template_kwargs": decode_field(first["chat_template_kwargs"], True),
                        "images": first["images"],
                    }
                )
            )
    return records, pairs_report(dropped, len(records), scores)


def original_rows(normalized: Path, split: str, limit: int | None) -> list[dict]:
    rows = pq.read_table(Path(normalized) / f"{split}.parquet").to_pylist()
    return rows if limit is None else rows[:limit]


def no_pairs_message(round_name: str | None, report: dict) -> str:
    where = f"round {round_name}" if round_name else "judge-pairs"
    reasons = "; ".join(f"{n} where {DROP_REASONS[r]}" for r, n in report["dropped_by_reason"].items()) or "none"
    return (
        f"{where}: the judge's scores gave no pair among {report['prompts_in']} prompts ({reasons}); nothing to train "
        "on. Change the judge (judge_pairs.judge, evaluate.judge_model), lower judge_pairs.min_margin, sample more "
        "varied answers (generate.temperature, generate.num_samples), or train the round on the original pairs "
        "(iterate.rounds.<round>.pairs: original or both)."
    )


def build_pairs(params: dict, samples: Path, normalized: Path, out_dir: Path) -> dict:
    """Score the answers of `samples`, pair them and write out_dir/train.parquet (the new pairs, with the original
    train pairs the round asks for) and out_dir/eval.parquet (the original eval split); returns the report."""
    round_cfg = params.get("round") or {"name": None, "pairs": "generated", "original_pairs": None}
    cfg = params["judge_pairs"]
    report: dict = {"round": round_cfg["name"], "pairs": round_cfg["pairs"]}
    records: list[dict] = []
    if round_cfg["pairs"] != "original":
        rows = pq.read_table(Path(samples) / SAMPLES_FILE).to_pylist()
        judged = pair_judge_params(params)
        source = judge_source(judged)
        check_judge(judged, source)
        judge = load_judge(judged, source, PartialState().device)
        scores = answer_scores(judge, rows)
        records, generated = judged_pairs(rows, scores, cfg["pairing"], cfg["min_margin"])
        report.update(generated, judge=judged["evaluate"]["judge"], judge_source=source)
        if not records and round_cfg["pairs"] == "generated":  # (with "both", the original pairs still train)
            raise PipelineError(no_pairs_message(round_cfg["name"], generated))
    if round_cfg["pairs"] != "generated":
        original = original_rows(normalized, "train", round_cfg["original_pairs"])
        report["original_pairs"] = len(original)
        records += original
    eval_rows = original_rows(normalized, "eval", None)
    for split, split_rows in (("train", records), ("eval", eval_rows)):
        pq.write_table(pa.Table.from_pylist(split_rows, schema=NORMALIZED_SCHEMA), Path(out_dir) / f"{split}.parquet")
    report["rows"] = {"train": len(records), "eval": len(eval_rows)}
    return report
