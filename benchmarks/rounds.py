"""Iterative rounds against one round given the same training steps, measured in the same run.

The default of rounds/params.yaml on the built-in task: round 1 trains on a small budget of the built-in pairs,
rounds 2 and 3 on pairs the policy wrote and the built-in judge ranked (reference: the round before). The baseline
is a single round on the built-in pairs alone with as many training steps as the three rounds together (one epoch
of that many pairs), at the rounds' learning rate and at the text default's (3e-5), each with its own schedule. Printed: each round's judged win rate over the initial
model with its bootstrap interval, the baseline's, and the two checks of docs/rounds.md: round 3 above round 1 by
more than round 1's interval half-width, and above the better baseline.

    python benchmarks/rounds.py                  # about a minute per seed on 2 cores
    python benchmarks/rounds.py --seeds 0 1 2    # the same with other seeds (data, warm-start, sampling)
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BASELINE_LEARNING_RATES = (3e-5,)  # the text default's (../params.yaml), beside the rounds' own


def quiet(_message: str) -> None:
    pass


def run_round(params: dict, name: str, previous: Path, root: Path, r: Path) -> tuple[dict, int]:
    """One round of `params` (iterate.rounds[name]) from `previous`, written under `r` (the initial model and the
    original pairs under `root`): its eval metrics and its training steps."""
    import stages.base as base_stage
    import stages.evaluate as evaluate_stage
    import stages.generate as generate_stage
    import stages.judge_pairs as judge_pairs_stage
    import stages.ref_logps as ref_stage
    import stages.tokenize as tokenize_stage
    import stages.train as train_stage
    from pipeline.config.params import round_params

    one = round_params(params, name)
    base_stage.run_round(one, previous, root / "round-0", r / "base")
    generate_stage.run(one, r / "base", root / "normalized", r / "samples", say=quiet)
    judge_pairs_stage.run(one, r / "samples", root / "normalized", r / "pairs")
    tokenize_stage.run(one, r / "pairs", r / "base", r / "tokenized")
    ref_stage.run(one, r / "tokenized", r / "base", r / "ref_logps")
    manifest = train_stage.run(
        one, r / "tokenized", r / "ref_logps", r / "base", r / "policy", root / "checkpoints", r / "live", say=quiet
    )
    metrics = evaluate_stage.run(
        one,
        r / "policy",
        r / "tokenized",
        r / "ref_logps",
        r / "pairs",
        r / "base",
        r / "eval",
        r / "eval.json",
        r / "live",
        versus=root / "round-0",
    )
    return metrics, manifest["train_metrics"]["global_step"]


def initial(metrics: dict) -> tuple[float, float, float]:
    """The win rate over the initial model, low and high: `versus/` unless the round's reference is the initial."""
    prefix = "versus/" if "versus/win_rate" in metrics else ""
    return tuple(metrics[f"{prefix}win_rate{s}"] for s in ("", "_low", "_high"))


def one_seed(seed: int, rounds_params: Path) -> dict:
    import stages.base as base_stage
    import stages.normalize as normalize_stage
    from pipeline.config.params import load_params

    params = load_params(rounds_params)
    params["seed"] = seed
    params["train"]["disable_tqdm"] = True
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        base_stage.run(params, root / "round-0")
        normalize_stage.run(params, root / "normalized")
        rows, previous, steps = [], root / "round-0", 0
        for name in params["iterate"]["rounds"]:
            metrics, n = run_round(params, name, previous, root, root / f"round-{name}")
            rows.append((name, n, initial(metrics)))
            previous, steps = root / f"round-{name}" / "policy", steps + n
        rounds_seconds = time.perf_counter() - start
        singles, single_seconds = {}, 0.0
        for rate in sorted({params["train"]["learning_rate"], *BASELINE_LEARNING_RATES}, reverse=True):
            single = copy.deepcopy(params)
            first = dict(params["iterate"]["rounds"]["1"])
            batch = params["train"]["per_device_train_batch_size"] * params["train"]["gradient_accumulation_steps"]
            first.update(pairs="original", original_pairs=steps * batch)
            first["train"] = {**first["train"], "num_train_epochs": 1, "learning_rate": rate}
            single["iterate"]["rounds"] = {"1": first}
            start = time.perf_counter()
            metrics, single_steps = run_round(single, "1", root / "round-0", root, root / f"single-{rate}")
            single_seconds = time.perf_counter() - start
            singles[rate] = (single_steps, initial(metrics))
    return {"rounds": rows, "steps": steps, "singles": singles, "seconds": (rounds_seconds, single_seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--params", type=Path, default=ROOT / "rounds" / "params.yaml")
    args = parser.parse_args()
    for seed in args.seeds:
        result = one_seed(seed, args.params)
        print(f"seed {seed}: judged win rate over the initial model (95% bootstrap interval)")
        for name, steps, (rate, low, high) in result["rounds"]:
            print(f"  round {name} ({steps} steps): {rate:.3f} ({low:.3f}-{high:.3f})")
        for learning_rate, (steps, (rate, low, high)) in result["singles"].items():
            print(
                f"  one round, original pairs only ({steps} steps, learning rate {learning_rate:g}): "
                f"{rate:.3f} ({low:.3f}-{high:.3f})"
            )
        (_, _, (first, low, high)), last = result["rounds"][0], result["rounds"][-1][2][0]
        half, best = (high - low) / 2, max(rate for _, (rate, _, _) in result["singles"].values())
        print(
            f"  last round - round 1 = {last - first:+.3f} (round 1's half-width {half:.3f}): "
            f"{'PASS' if last - first > half else 'FAIL'}; last round - the best one round of the same steps = "
            f"{last - best:+.3f}: {'PASS' if last > best else 'FAIL'}"
        )
        print(f"  seconds: rounds {result['seconds'][0]:.0f}, one round {result['seconds'][1]:.0f}")


if __name__ == "__main__":
    main()
