"""The pipeline's stages, in order: the one home of the stage list.

Each stage is a `dpo` subcommand (its module under `stages/`), a stage of `dvc.yaml` of the same name
(`tests/test_dvc_deps.py` checks that they agree), and the writer of one kind of artifact under `artifacts/`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str  # the `dpo` subcommand and the dvc.yaml stage
    module: str  # its module under stages/
    artifact: str  # the kind of artifact it writes: its manifest's kind and its folder under artifacts/


STAGES = (
    Stage("base", "base", "base"),
    Stage("normalize", "normalize", "normalized"),
    Stage("tokenize", "tokenize", "tokenized"),
    Stage("ref-logps", "ref_logps", "ref_logps"),
    Stage("train", "train", "train"),
    Stage("evaluate", "evaluate", "eval"),
    Stage("export", "export", "export"),
)
# the stages of iterative rounds (rounds/dvc.yaml), beside those above: a round's answers, its judged pairs (a
# normalized artifact: tokenize reads it like normalize's), and the progress table across rounds (no artifact)
ROUND_STAGES = (
    Stage("generate", "generate", "samples"),
    Stage("judge-pairs", "judge_pairs", "normalized"),
    Stage("progress", "progress", "progress"),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
PRODUCER = {stage.artifact: stage.name for stage in STAGES + ROUND_STAGES[:1]}  # artifact kind → its usual writer
PRODUCERS = {  # artifact kind → every stage that may write it
    kind: tuple(s.name for s in STAGES + ROUND_STAGES if s.artifact == kind) for kind in PRODUCER
}
