"""Default artifact locations: the one place dvc.yaml's paths are mirrored in code.

`artifacts/` is DVC-cached and git-ignored; `dvclive/` (training curves) and `results/` (eval
metrics, run report) are small, deterministic and tracked by git, so every commit and every
`dvc exp` holds the numbers that describe its run.
"""

from pathlib import Path

from pipeline.store.stage_list import ROUND_STAGES, STAGES

ARTIFACTS = Path("artifacts")
_OUT = {stage.name: ARTIFACTS / stage.artifact for stage in STAGES + ROUND_STAGES}  # each stage's artifact
BASE, NORMALIZED, TOKENIZED = _OUT["base"], _OUT["normalize"], _OUT["tokenize"]
REF_LOGPS, TRAIN, EVAL, EXPORT = _OUT["ref-logps"], _OUT["train"], _OUT["evaluate"], _OUT["export"]
SAMPLES = _OUT["generate"]
PAIRS = ARTIFACTS / "pairs"  # judge-pairs writes a normalized artifact of its own
CHECKPOINTS = ARTIFACTS / "checkpoints"  # the train stage's resumable state, beside its artifact
LIVE = Path("dvclive")
RESULTS = Path("results")
METRICS = RESULTS / "eval.json"
REPORT = RESULTS / "report.html"
