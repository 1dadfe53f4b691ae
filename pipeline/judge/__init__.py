"""Judging what a policy generates: sampling answers to held-out prompts, the judges that compare a policy's answer
with the reference's (the built-in program, a reward model, a pairwise LLM judge), the statistics of their verdicts
(win rate, bootstrap interval, length control) and the lm-evaluation-harness regression check."""
