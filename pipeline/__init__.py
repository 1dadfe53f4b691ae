"""A staged, cached DPO training pipeline. In-process API: `from pipeline import DPOConfig, DPOTrainer`."""

from .config import DPOConfig
from .errors import PipelineError
from .trainer import DPOTrainer

__all__ = ["DPOConfig", "DPOTrainer", "PipelineError"]
__version__ = "0.1.0"
