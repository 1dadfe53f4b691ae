"""The general-ability regression check of the evaluate stage: lm-evaluation-harness tasks run on the policy and on
the reference, side by side, so a DPO run that bought its win rate with general ability shows it.

DPO moves a policy towards the preferred answers of one data set; it can also drift elsewhere (worse knowledge,
broken formatting). `evaluate.lm_eval.tasks` names harness tasks (built-in ones such as `hellaswag` or `arc_easy`,
or the user's own YAML tasks under `evaluate.lm_eval.include_path`); each is run on both models as they are already
loaded in memory, through the harness's own `HFLM` wrapper and `simple_evaluate`, never a reimplementation, so the
figures are the ones the harness's leaderboards report. A task's metrics are the fraction of documents a model gets
right (accuracy and the like, in [0, 1]) with their standard errors, so a drop of the policy below the reference by
more than a couple of standard errors is a regression rather than noise.

lm-evaluation-harness is an optional extra (`pip install -e '.[eval]'`) and slow to start (its full task index reads
~14k YAML files: about half a minute on a small machine), so it is imported only inside the functions here, its
task index is built once per process, and only the include_path's is built when the tasks are all the user's own
(`tasks_index`). `check_tasks` refuses unknown task names and a bad include_path before any model is loaded or any
text generated; `run_harness` then runs. It runs the model in this process only (no sharding across ranks): call it
on the main process.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
from typing import Any

from pipeline.core.errors import PipelineError

HARNESS_EXTRA = "pip install -e '.[eval]' (or: pip install lm_eval)"
TASKS_KEY = "evaluate.lm_eval.tasks"
INCLUDE_PATH_KEY = "evaluate.lm_eval.include_path"


def require_harness() -> None:
    """Refuse clearly when lm-evaluation-harness is not installed (it is the optional `eval` extra)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:
        raise PipelineError(
            f"{TASKS_KEY} runs lm-evaluation-harness tasks, but lm-evaluation-harness is not installed "
            f"({error}). Install it: {HARNESS_EXTRA}; or set {TASKS_KEY}: [] to skip the check."
        ) from None


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None, include_defaults: bool = True):
    """The harness's task index (its built-in tasks unless `include_defaults` is false, then those under
    `include_path`, which override built-in ones of the same name), built once per process and arguments."""
    require_harness()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def tasks_index(tasks: list[str], include_path: str | None):
    """The smallest task index that resolves `tasks` as the full one would: the include_path's alone when every
    name is a plain task there (a task YAML is self-contained: its `include:` and `!function` are file paths, and a
    task there overrides a built-in one of its name anyway), so the harness's ~14k YAML files are not read for a
    user's own tasks; otherwise the full index (built-in names, groups and tags, which may name built-in tasks)."""
    if include_path is not None:
        own = task_manager(include_path, False)
        if set(tasks) <= set(own.all_subtasks):
            return own
    return task_manager(include_path, True)


def check_tasks(tasks: list[str], include_path: str | None) -> None:
    """Refuse, before anything is generated, an include_path that is not a directory and task names the harness
    does not know (with the close matches among its tasks, groups and tags). No tasks: nothing to check."""
    if not tasks:
        return
    if include_path is not None and not os.path.isdir(include_path):
        what = "does not exist" if not os.path.exists(include_path) else "is not a directory"
        raise PipelineError(
            f"{INCLUDE_PATH_KEY}: {include_path!r} {what}; it must be a directory of lm-evaluation-harness task "
            f"YAML files. Fix the path, or set {INCLUDE_PATH_KEY}: null to use the harness's own tasks only."
        )
    known = tasks_index(tasks, include_path).all_tasks
    known_names = set(known)
    unknown = [name for name in tasks if name not in known_names]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hints.append(f"{name!r} (did you mean {', '.join(map(repr, close))}?)" if close else repr(name))
    where = f"the harness's tasks and those under {include_path!r}" if include_path else "the harness's tasks"
    raise PipelineError(
        f"{TASKS_KEY}: unknown lm-evaluation-harness task(s) {', '.join(hints)}: not among {where}. Use task, group "
        f"or tag names as `lm_eval ls tasks` lists them, or put your own task YAML in a directory named by "
        f"{INCLUDE_PATH_KEY}."
    )


def run_harness(
    model,
    tokenizer,
    tasks: list[str],
    include_path: str | None,
    limit: int | None,
    num_fewshot: int | None,
    batch_size: int,
    seed: int,
) -> dict[str, dict[str, float | None]]:
    """Run harness `tasks` on an already-loaded causal LM and its tokenizer, on the model's device, and return
    `{task: {metric: value, metric + "_stderr": stderr}}` (JSON-able; a stderr the harness cannot give is None).

    `limit` documents per task (None: all), `num_fewshot` examples per document (None: each task's own), every
    random seed (Python, NumPy, torch, few-shot sampling) set from `seed`; no per-document samples kept and no
    request or response caching. The model is put in eval mode for the run and given back in the mode it came in.
    """
    check_tasks(tasks, include_path)
    if not tasks:
        return {}
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            use_cache=None,
            cache_requests=False,
            log_samples=False,
            write_out=False,
            task_manager=tasks_index(tasks, include_path),
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)
    return flat_results((results or {}).get("results", {}))


def flat_results(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """The harness's `results` block made flat: "acc,none" → "acc", "acc_stderr,none" → "acc_stderr"; a metric
    under another filter keeps it as "metric/filter" ("exact_match/strict-match", "exact_match/strict-match_stderr");
    the alias is dropped; "N/A" (and any non-finite figure) becomes None."""
    flat = {}
    for task_name, figures in results.items():
        row = {}
        for key, value in figures.items():
            if key == "alias" or "," not in key:
                continue
            metric, filter_name = key.split(",", 1)
            stderr = metric.endswith("_stderr")
            name = metric.removesuffix("_stderr") if stderr else metric
            name = name if filter_name == "none" else f"{name}/{filter_name}"
            row[name + "_stderr" if stderr else name] = _number(value)
        flat[task_name] = row
    return flat


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def side_by_side(policy: dict[str, dict], reference: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per task and metric for a report table: {task, metric, policy, policy_stderr, reference,
    reference_stderr, difference}, difference = policy − reference (None where either figure is missing). Tasks and
    metrics in the policy's order, then any only the reference has."""
    rows = []
    for task_name in [*policy, *(t for t in reference if t not in policy)]:
        mine, theirs = policy.get(task_name, {}), reference.get(task_name, {})
        metrics = [m for m in [*mine, *(m for m in theirs if m not in mine)] if not m.endswith("_stderr")]
        for metric in metrics:
            a, b = mine.get(metric), theirs.get(metric)
            rows.append(
                {
                    "task": task_name,
                    "metric": metric,
                    "policy": a,
                    "policy_stderr": mine.get(metric + "_stderr"),
                    "reference": b,
                    "reference_stderr": theirs.get(metric + "_stderr"),
                    "difference": None if a is None or b is None else a - b,
                }
            )
    return rows
