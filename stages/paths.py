"""Default artifact locations: the one place dvc.yaml's paths are mirrored in code."""

from pathlib import Path

ARTIFACTS = Path("artifacts")
BASE = ARTIFACTS / "base"
NORMALIZED = ARTIFACTS / "normalized"
TOKENIZED = ARTIFACTS / "tokenized"
REF_LOGPS = ARTIFACTS / "ref_logps"
TRAIN = ARTIFACTS / "train"
CHECKPOINTS = ARTIFACTS / "checkpoints"
LIVE = ARTIFACTS / "live"
EVAL = ARTIFACTS / "eval"
METRICS = ARTIFACTS / "metrics" / "eval.json"
EXPORT = ARTIFACTS / "export"
