"""Default artifact locations: the one place dvc.yaml's paths are mirrored in code.

`artifacts/` is DVC-cached and git-ignored; `dvclive/` (training curves) and `results/` (eval
metrics, run report) are small, deterministic and tracked by git, so every commit and every
`dvc exp` holds the numbers that describe its run.
"""

from pathlib import Path

ARTIFACTS = Path("artifacts")
BASE = ARTIFACTS / "base"
NORMALIZED = ARTIFACTS / "normalized"
TOKENIZED = ARTIFACTS / "tokenized"
REF_LOGPS = ARTIFACTS / "ref_logps"
TRAIN = ARTIFACTS / "train"
CHECKPOINTS = ARTIFACTS / "checkpoints"
EVAL = ARTIFACTS / "eval"
EXPORT = ARTIFACTS / "export"
LIVE = Path("dvclive")
RESULTS = Path("results")
METRICS = RESULTS / "eval.json"
REPORT = RESULTS / "report.html"
