"""What leaves a run: the export, the run report, the metrics file, runs side by side."""
