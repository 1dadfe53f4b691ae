"""Models and batches: loading, the batch layouts and their masks, the collators, the chunked log-prob head."""
