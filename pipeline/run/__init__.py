"""Running things: `DPOTrainer`, the train stage's run and resume, evaluation, the reference pass, the warm start."""
