"""Sweeps: several configurations trained side by side in chunks over one cached base/tokenize/ref-logps, ranked at
every rung and the losers stopped (successive halving), stopped, resumed or cloned by hand in between.

Each configuration is a train-stage run cut at chunk boundaries (`pipeline.run.sweep_plan`): at a boundary the run
logs, saves a checkpoint under `<checkpoints>/<fingerprint[:16]>/` (the train stage's own folder for these params,
with its `fingerprint.json`) and stops; its next chunk resumes from that checkpoint, with the Trainer's resume
rules (weights, optimizer, schedule, RNG, data order), so the run ends with the weights of an uninterrupted one.
After each chunk the run is evaluated on the eval split (and, for sweep.metric: win_rate, its answers to held-out
prompts judged against the reference's); the evaluation is appended to the checkpoint's log history, after the
checkpoint is saved, so it changes nothing the next chunk computes.

One model is in memory at a time: a full fine-tuning configuration is loaded from the base and its checkpoint for
each chunk; when every configuration trains a new LoRA adapter, the base stays loaded and only the adapter (with its
optimizer state) is swapped in from the checkpoint and taken off again after the chunk.

A clone starts from its parent's latest boundary: a copy of that checkpoint (weights, optimizer moments unless
fresh, schedule position, RNG, data position) taken with the clone's own settings. A warm start takes only the
weights and starts a fresh run (step 0). Both have a fingerprint of their own (the params' and the lineage's), so
the train stage never mistakes their checkpoints for a run of the same params from the base.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import shutil
from pathlib import Path
from typing import Callable

from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback, TrainerState, set_seed

from pipeline.config.train_params import dpo_config
from pipeline.core.errors import PipelineError
from pipeline.data.tables import load_pairs
from pipeline.judge.judges import check_judge, judge_kind, judge_source, load_judge
from pipeline.judge.results import compare_answers
from pipeline.judge.sampling import Sampling, generate_answers, held_out_prompts, prompts_file
from pipeline.model.loading import load_base_tokenizer, load_explicit_reference, load_policy, peft_config
from pipeline.run.resume import (
    FINGERPRINT_NAME,
    TRAINER_STATE_NAME,
    CheckpointFingerprintCallback,
    Fingerprint,
    read_fingerprint,
    run_checkpoints,
    run_fingerprint,
)
from pipeline.run.sweep_plan import (
    PEFT_PREFIX,
    STEP_KEYS,
    check_chunks,
    check_key,
    chunk_bounds,
    configuration_params,
    ranked,
    rung_due,
    survivors,
    sweep_configurations,
    total_steps,
)
from pipeline.run.sweep_state import (
    FINISHED,
    LIVE,
    RUNS_DIR,
    STOPPED,
    Run,
    SweepState,
    load_state,
    save_state,
    sweep_dir,
    take_requests,
)
from pipeline.run.tracking import rebuilt_live, without_timings
from pipeline.run.trainer import DPOTrainer
from pipeline.run.training import train_inputs
from pipeline.store.artifacts import write_json

CLONE, FRESH_OPTIMIZER, WARM_START = "clone", "fresh-optimizer", "warm-start"
# what a clone's starting checkpoint leaves out: a fresh optimizer has no moments and no schedule state (the
# schedule is set to the parent's step), a warm start keeps only the weights
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt")
RNG_FILES = ("rng_state.pth",)


@dataclasses.dataclass
class SweepPaths:
    tokenized: Path
    ref_logps: Path
    base: Path
    normalized: Path
    checkpoints: Path
    sweeps: Path


# ---- the Trainer at a chunk boundary ------------------------------------------------------------------------


class ChunkEnd(TrainerCallback):
    """Ends a `train()` call when the step reaches `bound`: that step is logged and checkpointed (the Trainer logs,
    then saves), then training stops. Refuses a run whose length is not the one the chunks were cut from."""

    def __init__(self, bound: int, total: int):
        self.bound, self.total = bound, total

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps != self.total:
            raise PipelineError(
                f"sweep: the Trainer plans {state.max_steps} steps where the sweep counted {self.total}; the chunks "
                "would not line up. Report this with your train settings."
            )

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.bound:
            control.should_log = control.should_save = control.should_training_stop = True


class OwnSettings(TrainerCallback):
    """A clone's first chunk: the optimizer state comes from the parent's checkpoint (or is fresh), but every param
    group takes this run's own settings (learning rate, betas, weight decay, ...) and the schedule is this run's,
    at the parent's step. `fresh` is set by `SweepTrainer.create_optimizer`."""

    fresh: list[dict] | None = None

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        continue_schedule(optimizer, lr_scheduler, self.fresh, state.global_step)


def continue_schedule(optimizer, scheduler, fresh: list[dict], step: int) -> None:
    """Give `optimizer`'s param groups the settings `fresh` (as a new optimizer of this run has them) and put the
    schedule at `step`: base learning rates this run's, each group's rate the schedule's value there."""
    scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper, if any
    if not isinstance(scheduler, LambdaLR):
        raise PipelineError(
            f"sweep clone: the learning-rate schedule is a {type(scheduler).__name__}, which cannot be moved to the "
            "parent's step; use a warm start (--warm-start) or an lr_scheduler_type such as linear or cosine."
        )
    groups = optimizer.param_groups
    for group, settings in zip(groups, fresh, strict=True):
        group.update(settings)
        group["initial_lr"] = settings["lr"]
    scheduler.base_lrs = [settings["lr"] for settings in fresh]
    scheduler.last_epoch = step
    rates = [base * schedule(step) for schedule, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, rate in zip(groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates


class SweepTrainer(DPOTrainer):
    """The DPOTrainer, noting the settings of the optimizer it creates (for `OwnSettings`)."""

    own_settings: OwnSettings | None = None

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.own_settings is not None and self.own_settings.fresh is None:
            self.own_settings.fresh = [
                {k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups
            ]
        return optimizer


def append_log(checkpoint: Path, entry: dict) -> None:
    """Add an evaluation made after a checkpoint was saved to the checkpoint's log history (the next chunk resumes
    with it, so the curves keep it)."""
    path = Path(checkpoint) / TRAINER_STATE_NAME
    state = json.loads(path.read_text())
    state["log_history"].append(entry)
    write_json(path, state)


def log_history(checkpoint: Path) -> list[dict]:
    return json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text())["log_history"]


# ---- the sweep ----------------------------------------------------------------------------------------------


class Sweep:
    """A sweep of params.yaml's `sweep` section over the cached artifacts in `paths`. `on_boundary(state)` is called
    after every chunk and rung (the stage writes the report and prints the table there)."""

    def __init__(
        self,
        params: dict,
        paths: SweepPaths,
        say: Callable[[str], None] = print,
        on_boundary: Callable[[SweepState], None] = lambda state: None,
    ):
        self.params, self.cfg, self.paths, self.say, self.on_boundary = params, params["sweep"], paths, say, on_boundary
        self.dir = sweep_dir(paths.sweeps, self.cfg["name"])
        self._pairs: dict = {}
        self._tokenizer = None
        self._shared_base = None
        self._reference_answers = None
        self._prompts = None
        self._all_lora = None
        self.state = self.plan()

    # -- planning: everything refused here is refused before anything trains

    def run_params(self, run: Run) -> dict:
        return configuration_params(self.params, run.overrides, f"sweep run {run.name} ({run.overrides})")

    def fingerprint(self, run_params: dict, start: dict | None = None) -> Fingerprint:
        inputs = train_inputs(run_params, self.paths.tokenized, self.paths.ref_logps, self.paths.base)
        plain = run_fingerprint(run_params, inputs)
        return plain if start is None else Fingerprint.of({**plain.record, "start": start})

    def steps_of(self, run_params: dict) -> int:
        args = dpo_config(run_params, "unused")
        return total_steps(self.rows(run_params), args)

    def rows(self, run_params: dict) -> int:
        return len(self.pairs(run_params, "train"))

    def plan(self) -> SweepState:
        if self.params["distributed"]["num_processes"] * self.params["distributed"]["num_machines"] > 1:
            raise PipelineError(
                "params: a sweep runs in one process, and distributed asks for more; set distributed.num_processes "
                "and num_machines to 1 for `dpo sweep` (or compare configurations with `dvc exp run --queue`)."
            )
        if self.cfg["metric"] == "win_rate":
            if judge_kind(self.params) == "none":
                raise PipelineError(
                    "params: sweep.metric is win_rate, but there is no judge (evaluate.judge resolves to none for "
                    f"data.train={self.params['data']['train']!r}); set evaluate.judge to reward_model or pairwise "
                    "(docs/evaluation.md), or rank by sweep.metric: loss."
                )
            check_judge(self.params, judge_source(self.params))
        if self.cfg["min_chunks"] > self.cfg["chunks"]:
            raise PipelineError(
                f"params: sweep.min_chunks is {self.cfg['min_chunks']} but sweep.chunks is {self.cfg['chunks']}; "
                "nothing could ever be stopped. Set min_chunks to at most chunks."
            )
        configurations = sweep_configurations(self.cfg)
        checked = []
        for i, overrides in enumerate(configurations):
            run_params = configuration_params(self.params, overrides, f"sweep configuration {i + 1} ({overrides})")
            total = self.steps_of(run_params)
            check_chunks(total, self.cfg["chunks"], f"configuration {i + 1} ({overrides})")
            checked.append((overrides, run_params, total))
        state = load_state(self.dir)
        if state is None:
            state = SweepState(self.cfg["name"], self.cfg["chunks"])
        elif state.chunks != self.cfg["chunks"]:
            raise PipelineError(
                f"params: sweep.chunks is {self.cfg['chunks']}, but sweep {state.name} began with {state.chunks} "
                f"chunks ({self.dir}); restore sweep.chunks: {state.chunks}, or name a new sweep (sweep.name)."
            )
        known = {json.dumps(r.overrides, sort_keys=True): r for r in state.runs.values() if r.start is None}
        wanted = set()
        for overrides, run_params, total in checked:
            key = json.dumps(overrides, sort_keys=True)
            wanted.add(key)
            fingerprint = self.fingerprint(run_params).digest
            if key in known:
                self._require_same(known[key], fingerprint)
                continue
            name = state.next_name()
            state.runs[name] = Run(name, overrides, fingerprint, total)
        for key, run in known.items():
            if key not in wanted and run.state == LIVE:
                run.state = STOPPED
                run.stopped = {"chunk": run.chunks_done, "by": "hand", "why": "no longer in the sweep's configurations"}
        for run in state.runs.values():
            if run.start is not None and run.state == LIVE:
                self._require_same(run, self.fingerprint(self.run_params(run), run.start).digest)
        return state

    def _require_same(self, run: Run, fingerprint: str) -> None:
        if run.fingerprint == fingerprint or run.chunks_done == 0:
            run.fingerprint = fingerprint
            return
        raise PipelineError(
            f"sweep {self.cfg['name']}: run {run.name} ({run.overrides}) was trained with other params or inputs "
            f"than params.yaml's now (its checkpoints are {run.fingerprint[:16]}, these params give "
            f"{fingerprint[:16]}); restore params.yaml, or name a new sweep (sweep.name) to start over."
        )

    # -- data and models

    def pairs(self, run_params: dict, split: str):
        precomputed = bool(run_params["train"].get("precompute_ref_log_probs"))
        key = (split, precomputed)
        if key not in self._pairs:
            self._pairs[key] = load_pairs(self.paths.tokenized, split, self.paths.ref_logps if precomputed else None)
        return self._pairs[key]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_base_tokenizer(self.paths.base, self.params)
        return self._tokenizer

    def all_lora(self) -> bool:
        if self._all_lora is None:
            self._all_lora = all(self.run_params(r)["model"]["peft"]["enabled"] for r in self.state.runs.values())
        return self._all_lora

    def policy(self, run_params: dict):
        """The model a chunk starts from (its checkpoint then loads over it): the shared base when every run trains
        a new LoRA adapter, else the base loaded afresh."""
        if not self.all_lora():
            return load_policy(self.paths.base, run_params)
        if self._shared_base is None:
            self._shared_base = load_policy(self.paths.base, run_params)
        return self._shared_base

    def release(self, trainer) -> None:
        """After a chunk: take the adapter off the shared base (the next run puts its own on), or drop the model."""
        model = trainer.model
        if self._shared_base is not None and hasattr(model, "unload"):
            self._shared_base = model.unload()
        trainer.model = trainer.model_wrapped = None
        del trainer, model
        gc.collect()

    # -- one chunk of one run

    def checkpoint_of(self, run: Run) -> Path | None:
        directory = run_checkpoints(self.paths.checkpoints, run.fingerprint)
        checkpoint = directory / f"checkpoint-{run.step}"
        if run.step == 0 and run.start is None:
            return None
        if read_fingerprint(checkpoint) is None:
            raise PipelineError(
                f"sweep {self.cfg['name']}: run {run.name}'s checkpoint {checkpoint} is missing or incomplete, so it "
                "cannot continue where it stopped; `dpo sweep stop "
                f"{run.name}` leaves it as it is, or remove {self.dir} to start the sweep afresh."
            )
        return checkpoint

    def train_chunk(self, run: Run) -> None:
        """Train `run` on its next chunk, checkpoint it at the boundary, evaluate it there."""
        run_params = self.run_params(run)
        directory = run_checkpoints(self.paths.checkpoints, run.fingerprint)
        checkpoint = self.checkpoint_of(run)
        for stale in directory.glob("checkpoint-*") if directory.is_dir() else []:
            if stale != checkpoint:  # a later boundary of a killed chunk, or an older one: never mixed in
                shutil.rmtree(stale, ignore_errors=True)
        bound = chunk_bounds(run.total_steps, self.state.chunks)[run.chunks_done]
        args = dpo_config(run_params, directory, resume_from_checkpoint=None, save_strategy="no")
        train_set = self.pairs(run_params, "train")
        eval_set = self.pairs(run_params, "eval")
        model = self.policy(run_params)
        reference = None if args.precompute_ref_log_probs else load_explicit_reference(self.paths.base, run_params)
        first_of_clone = (
            run.start is not None
            and run.start["mode"] in (CLONE, FRESH_OPTIMIZER)
            and run.chunks_done == run.start["chunk"]
        )
        own = OwnSettings() if first_of_clone else None
        # before the trainer: building a fingerprint builds a DPOConfig, which resets accelerate's state
        fingerprint = Fingerprint(self.fingerprint(run_params, run.start).record, run.fingerprint)
        set_seed(args.seed)  # as the train stage: a new adapter's initial weights are drawn in the constructor
        trainer = SweepTrainer(
            model=model,
            ref_model=reference,
            args=args,
            train_dataset=train_set,
            eval_dataset=eval_set if args.eval_strategy != "no" else None,
            processing_class=self.tokenizer,
            callbacks=[ChunkEnd(bound, run.total_steps), *([own] if own else [])],
            peft_config=peft_config(run_params),
        )
        trainer.own_settings = own
        trainer.add_callback(CheckpointFingerprintCallback(fingerprint))
        self.say(f"sweep: {run.name}: chunk {run.chunks_done + 1}/{self.state.chunks} (steps {run.step + 1}-{bound})")
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if trainer.state.global_step != bound:
            raise PipelineError(
                f"sweep: run {run.name} stopped at step {trainer.state.global_step} instead of {bound}; "
                "its checkpoint is left as it is."
            )
        metrics = without_timings(trainer.evaluate(eval_dataset=eval_set))
        if self.cfg["metric"] == "win_rate":
            metrics["eval_win_rate"] = self.win_rate(trainer.model, run_params)
        saved = directory / f"checkpoint-{bound}"
        append_log(saved, {**metrics, "epoch": trainer.state.epoch, "step": bound})
        self.release(trainer)
        if checkpoint is not None and checkpoint != saved:
            shutil.rmtree(checkpoint, ignore_errors=True)
        rebuilt_live(self.live_dir(run), log_history(saved)).end()
        run.chunks_done += 1
        run.step = bound
        run.history.append({"chunk": run.chunks_done, "step": bound, "metrics": as_names(metrics)})
        if run.chunks_done == self.state.chunks:
            run.state = FINISHED
        save_state(self.dir, self.state)

    def live_dir(self, run: Run) -> Path:
        return self.dir / RUNS_DIR / run.name / "dvclive"

    # -- the judged win rate at a boundary

    def prompts(self) -> list[dict]:
        if self._prompts is None:
            limit, file = self.cfg["judge_prompts"], self.params["evaluate"]["prompts"]
            self._prompts = prompts_file(file, limit) if file else held_out_prompts(self.paths.normalized, limit)
        return self._prompts

    def reference_answers(self) -> list[str]:
        """The reference's answers to the judge prompts, written once per sweep invocation (its model is loaded for
        that alone, then dropped)."""
        if self._reference_answers is None:
            explicit = load_explicit_reference(self.paths.base, self.params)
            model = explicit if explicit is not None else load_policy(self.paths.base, self.params, trainable=False)
            answers = generate_answers(model, self.tokenizer, self.prompts(), self.sampling())
            self._reference_answers = [a[0] for a in answers]
            del model, explicit
            gc.collect()
        return self._reference_answers

    def sampling(self) -> Sampling:
        return dataclasses.replace(Sampling.of_params(self.params), num_samples=1)

    def win_rate(self, model, run_params: dict) -> float:
        reference = self.reference_answers()
        answers = [a[0] for a in generate_answers(model, self.tokenizer, self.prompts(), self.sampling())]
        judge = load_judge(self.params, judge_source(self.params), model.device)
        try:
            figures = compare_answers(
                judge,
                [p["prompt"] for p in self.prompts()],
                answers,
                reference,
                self.tokenizer,
                resamples=1,
                seed=self.params["seed"],
            )
        finally:
            del judge
            gc.collect()
        return figures.get("win_rate", float("nan"))

    # -- the loop

    def run(self) -> SweepState:
        """Train every live run chunk by chunk (the runs furthest behind first), rank them at each rung, apply the
        hand requests at every boundary; returns the state when no live run has chunks left."""
        self.apply_requests()
        while True:
            waiting = [r for r in self.state.live() if r.chunks_done < self.state.chunks]
            if not waiting:
                break
            chunk = min(r.chunks_done for r in waiting)
            for run in [r for r in waiting if r.chunks_done == chunk]:
                self.apply_requests()
                if run.state == LIVE:
                    self.train_chunk(run)
                    self.on_boundary(self.state)
            self.apply_requests()
            if rung_due(chunk + 1, self.cfg):
                self.rung(chunk + 1)
                self.on_boundary(self.state)
        return self.state

    def rung(self, chunk: int) -> None:
        """Successive halving among the live runs that have just trained `chunk` chunks."""
        here = [r for r in self.state.live() if r.chunks_done == chunk]
        if len(here) < 2:
            return
        metric = self.cfg["metric"]
        metrics = {r.name: r.metrics for r in here}
        scores = {r.name: r.metrics.get(metric) for r in here}
        kept = survivors(metrics, metric, self.cfg["eta"])
        for position, name in enumerate(ranked(metrics, metric), 1):
            if name in kept:
                continue
            run = self.state.runs[name]
            run.state = STOPPED
            value = scores[name]
            run.stopped = {
                "chunk": chunk,
                "by": "rule",
                "why": f"successive halving at chunk {chunk}: {metric} {format_score(value)} ranked {position} of "
                f"{len(here)}; the best {len(kept)} go on",
            }
            self.say(f"sweep: {name} stopped: {run.stopped['why']}")
        self.state.rungs.append({"chunk": chunk, "metric": metric, "scores": scores, "kept": kept})
        save_state(self.dir, self.state)

    # -- stop, resume, clone

    def apply_requests(self) -> None:
        for request in take_requests(self.dir):
            try:
                self.say(f"sweep: {apply_request(self, request)}")
            except PipelineError as err:
                self.say(f"sweep: request {request} not applied: {err}")
        save_state(self.dir, self.state)

    def clone(self, parent_name: str, overrides: dict, mode: str) -> Run:
        """A new run from `parent_name`'s latest chunk boundary with `overrides` over the parent's settings."""
        parent = self.state.run(parent_name)
        for key in overrides:
            check_key(key, "sweep clone -S")
        if mode != WARM_START:
            fixed = [k for k in overrides if k in STEP_KEYS or k.startswith(PEFT_PREFIX)]
            if fixed:
                raise PipelineError(
                    f"sweep clone: {fixed[0]} cannot change in a clone, which continues its parent's steps with the "
                    "parent's data order and adapter shape; use --warm-start (a fresh run from the parent's weights)."
                )
        if parent.chunks_done == 0:
            raise PipelineError(
                f"sweep clone: run {parent.name} has not trained a chunk yet, so there is no boundary to start from; "
                f"clone it after its first chunk, or add the settings to sweep.grid."
            )
        source = self.checkpoint_of(parent)
        settings = {**parent.overrides, **overrides}
        name = self.state.next_name()
        run_params = configuration_params(self.params, settings, f"sweep clone {name} ({settings})")
        warm = mode == WARM_START
        start = {
            "parent": parent.name,
            "fingerprint": parent.fingerprint,
            "chunk": 0 if warm else parent.chunks_done,
            "step": parent.step,
            "mode": mode,
        }
        fingerprint = self.fingerprint(run_params, start)
        total = self.steps_of(run_params) if warm else parent.total_steps
        if warm:
            check_chunks(total, self.state.chunks, f"the warm start {name} ({settings})")
        elif self.steps_of(run_params) != parent.total_steps:
            raise PipelineError(f"sweep clone: {settings} changes the run's length; use --warm-start.")
        step = 0 if warm else parent.step
        target = run_checkpoints(self.paths.checkpoints, fingerprint) / f"checkpoint-{step}"
        start_checkpoint(source, target, mode, fingerprint, dpo_config(run_params, "unused"), total)
        run = Run(
            name,
            settings,
            fingerprint.digest,
            total,
            chunks_done=0 if warm else parent.chunks_done,
            step=step,
            parent=parent.name,
            start=start,
            history=[] if warm else copy.deepcopy(parent.history),
        )
        self.state.runs[name] = run
        self._all_lora = None
        if self._shared_base is not None and not self.all_lora():
            self._shared_base = None  # a warm start without an adapter: models come from disk from now on
        rebuilt_live(self.live_dir(run), log_history(target)).end()
        save_state(self.dir, self.state)
        return run


def start_checkpoint(source: Path, target: Path, mode: str, fingerprint: Fingerprint, args, total: int) -> None:
    """A clone's first checkpoint, made from its parent's: the whole checkpoint (clone), without the optimizer and
    schedule state (fresh-optimizer), or only the weights with a Trainer state at step 0 (warm-start). Its Trainer
    state takes the clone's own logging, evaluation and batch settings (`args`, a DPOConfig; `total` steps)."""
    if target.exists():
        shutil.rmtree(target)
    staging = target.with_name(target.name + ".tmp-clone")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    dropped = {CLONE: (), FRESH_OPTIMIZER: OPTIMIZER_FILES, WARM_START: OPTIMIZER_FILES + RNG_FILES}[mode]
    for name in dropped:
        (staging / name).unlink(missing_ok=True)
    state = json.loads((staging / TRAINER_STATE_NAME).read_text())
    own = TrainerState(train_batch_size=args.per_device_train_batch_size * max(1, args.n_gpu))
    own.compute_steps(args, total)
    settings = ("logging_steps", "eval_steps", "save_steps", "train_batch_size")
    if mode == WARM_START:  # a fresh run: nothing of the parent's progress
        fresh = dataclasses.asdict(own)
        state = {**{k: v for k, v in fresh.items() if k in state}, "stateful_callbacks": state["stateful_callbacks"]}
    state.update({k: getattr(own, k) for k in settings})
    write_json(staging / TRAINER_STATE_NAME, state)
    write_json(staging / FINGERPRINT_NAME, {"fingerprint": fingerprint.digest, "record": fingerprint.record})
    staging.rename(target)


def apply_request(sweep: Sweep, request: dict) -> str:
    """Carry out one hand request on the sweep's state; returns what was done, in a line."""
    action, name = request["action"], request["run"]
    state = sweep.state
    if action == "clone":
        run = sweep.clone(name, request.get("overrides", {}), request.get("mode", CLONE))
        return f"{run.name}: a {run.start['mode']} of {name} at chunk {run.start['chunk']} with {request['overrides']}"
    run = state.run(name)
    if action == "stop":
        if run.state != LIVE:
            return f"{name} is already {run.state}"
        run.state = STOPPED
        run.stopped = {"chunk": run.chunks_done, "by": "hand", "why": "dpo sweep stop"}
        return f"{name} stopped by hand after chunk {run.chunks_done}"
    if action == "resume":
        if run.state == FINISHED:
            raise PipelineError(
                f"run {name} has trained all {state.chunks} chunks; clone it (`dpo sweep clone {name} -S ...`) to "
                "train on with other settings."
            )
        if run.state == LIVE:
            return f"{name} is already live"
        run.state, run.stopped = LIVE, None
        return f"{name} resumes after chunk {run.chunks_done}"
    raise PipelineError(f"unknown sweep request {action!r}")


def as_names(metrics: dict) -> dict:
    """Trainer eval metrics (`eval_loss`, `eval_rewards/accuracies`) under sweep.metric's names."""
    return {k.removeprefix("eval_"): v for k, v in metrics.items() if k.startswith("eval_")}


def format_score(value) -> str:
    return "missing" if value is None else f"{value:.4g}"
