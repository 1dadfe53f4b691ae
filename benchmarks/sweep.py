"""`dpo sweep`, measured against its baselines in the same run.

1. Memory: the peak RSS of a sweep of 4 LoRA configurations (one base in memory, adapters swapped at chunk
   boundaries) next to the peak RSS of one LoRA run of the train stage, each in a fresh process, on a built-in model
   made large enough that its weights show in the RSS (`--hidden`, `--layers`). Target: within 15%.
2. Early stopping: the built-in task with 4 learning rates, the last 100x too high, ranked by the judged win rate:
   successive halving (eta 2) next to the same sweep run to the end (eta 1, which trains each configuration exactly
   as a run alone would). Printed: the steps and seconds each spends, where the bad one stopped, and whether the
   best runs agree. Target: at most 60% of the steps, the bad one stopped at the first rung, the same best run.

    python benchmarks/sweep.py                       # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

LEARNING_RATES = (3e-4, 1e-3, 3e-3, 1e-1)

CHILD = """
import json, resource, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from pathlib import Path
params = json.loads(Path({params!r}).read_text())
root, out = Path({data!r}), Path({out!r})
if {kind!r} == "train":
    import stages.train as train
    train.run(params, root / "tokenized", root / "ref_logps", root / "base", out / "train", out / "ck", out / "live",
              say=lambda m: None)
else:
    from pipeline.run.sweep import Sweep, SweepPaths
    paths = SweepPaths(root / "tokenized", root / "ref_logps", root / "base", root / "normalized", out / "ck", out / "sw")
    Sweep(params, paths, say=lambda m: None).run()
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def base_params(hidden: int, layers: int, pairs: int) -> dict:
    from conftest import tiny_params

    raw = copy.deepcopy(tiny_params(learning_rate=1e-3, num_train_epochs=1, logging_steps=5))
    raw["model"]["builtin"].update(hidden_size=hidden, num_layers=layers, num_heads=4, warmup_steps=400)
    raw["data"]["builtin"].update(num_pairs=pairs, num_eval_pairs=48)
    return raw


def checked(raw: dict) -> dict:
    from pipeline.config.params import check_params
    from pipeline.config.train_params import check_train

    return check_train(check_params(raw))


def peak_rss(kind: str, params: dict, data: Path, work: Path) -> int:
    """The peak RSS (KiB) of one process running the train stage or a sweep with `params`."""
    work.mkdir(parents=True)
    (work / "params.json").write_text(json.dumps(params))
    code = CHILD.format(
        root=str(ROOT),
        tests=str(ROOT / "tests"),
        params=str(work / "params.json"),
        data=str(data),
        out=str(work),
        kind=kind,
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    return int(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB")))


def memory(args, tmp: Path) -> None:
    from conftest import prepare_stages

    raw = base_params(args.hidden, args.layers, args.pairs)
    raw["model"]["builtin"]["warmup_steps"] = 20  # memory, not answers: a short warm start
    raw["model"]["peft"].update(enabled=True, r=16, lora_alpha=32)
    data = tmp / "memory"
    prepare_stages(checked(raw), data, through="ref-logps")
    one = checked(raw)
    sweep_raw = copy.deepcopy(raw)
    sweep_raw["sweep"].update(
        grid={"train.learning_rate": [1e-4, 1e-3], "train.beta": [0.1, 0.5]}, eta=1, metric="loss"
    )
    sweep = checked(sweep_raw)
    from pipeline.model.loading import load_policy

    size = sum(p.numel() * p.element_size() for p in load_policy(data / "base", one).parameters())
    single = peak_rss("train", one, data, tmp / "m-train")
    swept = peak_rss("sweep", sweep, data, tmp / "m-sweep")
    print(f"memory: model weights {size / 2**20:.0f} MiB (hidden {args.hidden}, {args.layers} layers), LoRA r=16")
    print(f"  one LoRA run (dpo train)       peak RSS {single / 1024:8.0f} MiB")
    print(f"  4 LoRA configurations (sweep)  peak RSS {swept / 1024:8.0f} MiB   ratio {swept / single:.3f}")


def early_stopping(args, tmp: Path) -> None:
    from conftest import prepare_stages
    from pipeline.run.sweep import Sweep, SweepPaths
    from pipeline.run.sweep_plan import ranked

    raw = base_params(32, 1, 160)
    data = tmp / "stopping"
    prepare_stages(checked(raw), data, through="ref-logps")
    results = {}
    for eta in (1, 2):
        sweep_raw = copy.deepcopy(raw)
        sweep_raw["sweep"].update(
            configurations=[{"train.learning_rate": lr} for lr in LEARNING_RATES],
            chunks=4,
            eta=eta,
            metric="win_rate",
            judge_prompts=48,
            name=f"eta{eta}",
        )
        paths = SweepPaths(
            *(data / n for n in ("tokenized", "ref_logps", "base", "normalized")), tmp / "ck", tmp / "sw"
        )
        start = time.perf_counter()
        state = Sweep(checked(sweep_raw), paths, say=lambda m: None).run()
        results[eta] = (state, time.perf_counter() - start)
    full, full_s = results[1]
    halving, halving_s = results[2]
    steps = {eta: sum(r.step for r in state.runs.values()) for eta, (state, _) in results.items()}
    best_full = ranked({n: r.metrics for n, r in full.runs.items()}, "win_rate")[0]
    best_halving = [n for n, r in halving.runs.items() if r.state == "finished"]
    bad = halving.runs["c4"]
    print(f"early stopping: 4 learning rates {LEARNING_RATES} (the last 100x the best), ranked by win_rate")
    for name, run in full.runs.items():
        line = " ".join(f"{h['metrics'].get('win_rate', float('nan')):.3f}" for h in run.history)
        print(f"  {name} lr {run.overrides['train.learning_rate']:<7g} full-run win rate by chunk: {line}")
    print(f"  to the end (eta 1): {steps[1]} steps, {full_s:6.1f} s; best {best_full}")
    print(
        f"  halving (eta 2):    {steps[2]} steps, {halving_s:6.1f} s; best {best_halving}; "
        f"steps {steps[2] / steps[1]:.2f} of the full runs, time {halving_s / full_s:.2f}"
    )
    print(f"  the bad one: {bad.state} at chunk {(bad.stopped or {}).get('chunk')} ({(bad.stopped or {}).get('why')})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=160)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_memory:
            memory(args, Path(tmp))
        early_stopping(args, Path(tmp))


if __name__ == "__main__":
    main()
