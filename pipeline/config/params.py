"""The params schema: the one home of every params.yaml default, type, range and help text.

One dataclass per section; a field's metadata holds its help and its value rule (`pipeline.config.rules`).
The `train` section takes any `DPOConfig` option or `TrainingArguments` field. Every stage checks its keys
here (`check_train_keys`), without building a `DPOConfig`; the stages that build one (train, evaluate,
export) check its values against `DPOConfig` itself (`pipeline.config.train_params`). DPO options whose one
home is another section (the stage that applies them for every later stage, e.g. `tokenize.max_length`) take
their default, help and rule from the option table (`pipeline.config.options.DPO_OPTIONS`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from transformers import TrainingArguments

from pipeline.builtin import BUILTIN_DATA, BUILTIN_DATASETS, BUILTIN_MODEL, BUILTIN_MODELS
from pipeline.builtin.task import split_capacities
from pipeline.config.options import (
    DPO_OPTION_NAMES,
    DPO_OPTIONS,
    HUB_TIMEOUT_S,
    HUB_TRIES,
    TRAINING_DEFAULTS,
    check_finite,
    field_rules,
)
from pipeline.config.rules import at_least, check, dtype_name, greater_than, one_of, within
from pipeline.core.errors import PipelineError
from pipeline.core.redaction import credential_keys, looks_like_token


def knob(default: Any = None, help: str = "", rule=None, fix: str = "", factory=None):
    metadata = {"help": help, "rule": rule, "fix": fix}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def owned(name: str):
    """A DPO option whose params.yaml home is this section: default, help and rule are its `DPO_OPTIONS` entry's."""
    entry = DPO_OPTIONS[name]
    metadata = {"help": entry.help, "rule": entry.rule, "fix": entry.fix, "dpo_option": name}
    if isinstance(entry.default, (list, dict)):
        return field(default_factory=entry.default_value, metadata=metadata)
    return field(default=entry.default, metadata=metadata)


@dataclass
class PeftParams:
    enabled: bool = knob(
        False, "Train a new LoRA adapter (the reference is the base with the adapter off); false: full fine-tuning."
    )
    r: int = knob(16, "LoRA rank.", at_least(1))
    lora_alpha: int = knob(32, "LoRA scaling numerator (scale = lora_alpha / r).", greater_than(0))
    lora_dropout: float = knob(
        0.05, "Dropout on the LoRA input (turned off with train.disable_dropout).", within(0, 1, high_open=True)
    )
    target_modules: str | list[str] = knob(
        "all-linear", "Modules that get adapters: all-linear or a list of names, e.g. [q_proj, v_proj]."
    )
    bias: str = knob("none", "Which biases train: none, all or lora_only.", one_of("none", "all", "lora_only"))
    modules_to_save: list[str] | None = knob(None, "Modules trained in full next to the adapters, e.g. [lm_head].")
    use_rslora: bool = knob(False, "Rank-stabilised LoRA scaling (lora_alpha / sqrt(r)).")
    use_dora: bool = knob(False, "Weight-decomposed LoRA (DoRA).")


@dataclass
class QuantizationParams:
    load_in_4bit: bool = knob(
        False, "QLoRA: load the base in 4 bits through bitsandbytes (CUDA only); needs peft.enabled or adapter."
    )
    bnb_4bit_quant_type: str = knob("nf4", "4-bit data type: nf4 or fp4.", one_of("nf4", "fp4"))
    bnb_4bit_compute_dtype: str = knob("bfloat16", "dtype of the 4-bit layers' matrix products.", dtype_name)
    bnb_4bit_use_double_quant: bool = knob(True, "Quantize the quantization constants too.")


@dataclass
class BuiltinModelParams:
    hidden_size: int = knob(64, "Hidden size of the built-in model (a multiple of num_heads).", at_least(1))
    num_layers: int = knob(2, "Transformer layers of the built-in model.", at_least(1))
    num_heads: int = knob(4, "Attention heads of the built-in model.", at_least(1))
    warmup_steps: int = knob(800, "Optimizer steps of the base stage's supervised warm start.", at_least(1))
    warmup_batch_size: int = knob(32, "Batch size of the warm start.", at_least(1))
    warmup_learning_rate: float = knob(3e-3, "Learning rate of the warm start.", greater_than(0))
    warmup_positive_fraction: float = knob(
        0.3,
        "Share of praising answers in the warm start (the rest pan): "
        "below 0.5 the reference prefers the dispreferred behaviour.",
        within(0, 1),
    )


@dataclass
class ModelParams:
    name_or_path: str = knob(
        BUILTIN_MODEL,
        "The base model: builtin:tiny-llama (builtin:tiny-llava, the "
        "vision-language one), a Hub id or a local directory.",
    )
    revision: str | None = knob(None, "Hub revision (branch, tag or commit) of the base model.")
    trust_remote_code: bool = owned("trust_remote_code")
    attn_implementation: str | None = knob(
        None,
        "Attention kernel: sdpa, eager, flex_attention (on a GPU the "
        "fastest with prefix sharing), flash_attention_2, ...; null: the "
        "transformers default.",
    )
    model_init_kwargs: dict | None = owned("model_init_kwargs")
    ref_name_or_path: str | None = knob(
        None,
        "An explicit reference model; null: the initial policy (for a new adapter: the base with the adapter off).",
    )
    ref_revision: str | None = knob(None, "Hub revision of the reference model.")
    ref_model_init_kwargs: dict | None = owned("ref_model_init_kwargs")
    adapter: str | None = knob(
        None, "A PEFT adapter (directory or Hub id) to continue training; its starting state is the reference."
    )
    peft: PeftParams = knob(help="A new LoRA adapter (peft.LoraConfig fields).", factory=PeftParams)
    quantization: QuantizationParams = knob(help="QLoRA loading of the base.", factory=QuantizationParams)
    builtin: BuiltinModelParams = knob(
        help="The built-in model only: its size and warm start.", factory=BuiltinModelParams
    )


@dataclass
class BuiltinDataParams:
    num_pairs: int = knob(2000, "Training pairs of the built-in task.", at_least(1))
    num_eval_pairs: int = knob(200, "Held-out pairs of the built-in task.", at_least(1))


@dataclass
class DataParams:
    train: str = knob(
        BUILTIN_DATA,
        "Training data: builtin:sentiment (builtin:vision-colors, the picture "
        "task), a local file/glob/directory or a Hub dataset id.",
    )
    eval: str | None = knob(None, "Eval data with its own source; null: carve eval_fraction of train's prompts.")
    eval_fraction: float = knob(
        0.1, "Share of train's prompts carved out for eval (seeded).", within(0, 1, low_open=True, high_open=True)
    )
    name: str | None = knob(None, "Hub dataset configuration name.")
    split: str = knob("train", "Split of the training source.")
    eval_split: str | None = knob(None, "Split of the eval source; null: split.")
    revision: str | None = knob(None, "Hub dataset revision.")
    prompt_marker: str | None = knob(
        None,
        "Implicit-prompt text: the prompt ends after the marker's last shared "
        'occurrence, e.g. "\\n\\nAssistant:" for HH-RLHF.',
    )
    columns: dict = knob(help="Canonical name → the source's column, e.g. {chosen: accepted}.", factory=dict)
    preprocess: str | None = knob(None, "module:function or path/to/file.py:function: raw row → canonical columns.")
    image_root: str | None = knob(
        None,
        "A directory image paths may also point into (absolute, or relative to the "
        "data file's directory), e.g. a shared image folder; null: the data file's "
        "directory only.",
    )
    on_invalid: str = owned("on_invalid")
    builtin: BuiltinDataParams = knob(help="The built-in task only.", factory=BuiltinDataParams)


@dataclass
class TokenizeParams:
    max_length: int | None = owned("max_length")
    truncation_mode: str = owned("truncation_mode")
    batch_size: int = knob(1000, "Rows tokenized per record batch.", at_least(1))
    dataset_num_proc: int | None = owned("dataset_num_proc")
    max_unknown_rate: float = knob(
        0.05,
        "Largest share of a split's tokens that may be the tokenizer's unknown token "
        "(`<unk>`) before tokenize refuses: above it the tokenizer does not cover the "
        "data; 1: never refuse.",
        within(0, 1),
    )


@dataclass
class RefLogpsParams:
    precompute_ref_batch_size: int | None = owned("precompute_ref_batch_size")


JUDGES = ("auto", "builtin", "reward_model", "pairwise", "none")  # evaluate.judge (pipeline.judge.judges)


@dataclass
class JudgeModelParams:
    name_or_path: str | None = knob(
        None,
        "The judge's model: for reward_model a sequence-classification model, for pairwise a causal LM; a Hub id "
        "or a local directory (under dvc repro, list a local one in the evaluate stage's deps). Loaded with "
        "model.trust_remote_code and model.model_init_kwargs, like the policy.",
    )
    revision: str | None = knob(None, "Hub revision (branch, tag or commit) of the judge model.")
    template: str | None = knob(
        None,
        "pairwise: a text file with the judge's prompt, with {prompt}, {first} and {second}; null: the built-in "
        "template (docs/evaluation.md).",
    )
    max_new_tokens: int = knob(4, "pairwise: tokens the judge may write for its verdict (A or B).", at_least(1))


@dataclass
class LmEvalParams:
    tasks: list[str] = knob(
        help="lm-evaluation-harness tasks run on the policy and on the reference, side by side (needs the eval "
        "extra: pip install -e '.[eval]'); []: none.",
        factory=list,
    )
    include_path: str | None = knob(None, "A directory of your own lm-evaluation-harness task YAML files.")
    limit: int | None = knob(None, "Documents per task (null: all); a quick check on a sample.", at_least(1))
    num_fewshot: int | None = knob(None, "Few-shot examples per document; null: each task's own.", at_least(0))


@dataclass
class EvaluateParams:
    batch_size: int = knob(32, "Pairs per forward pass and prompts per generation batch.", at_least(1))
    num_generations: int = knob(
        120,
        "Held-out prompts answered by policy and reference, on any data (judged by evaluate.judge; 0: none).",
        at_least(0),
    )
    max_new_tokens: int = knob(24, "Tokens generated per answer.", at_least(1))
    prompts: str | None = knob(
        None,
        "A file of held-out prompts (.jsonl, .json or .parquet with a `prompt` field: text or chat messages); "
        "null: the distinct prompts of the eval split.",
    )
    do_sample: bool = knob(False, "Sample the answers (with temperature and top_p); false: greedy.")
    temperature: float = knob(1.0, "Sampling temperature (with do_sample).", greater_than(0))
    top_p: float = knob(
        1.0, "Nucleus sampling: the smallest set of tokens with this much probability.", within(0, 1, low_open=True)
    )
    num_samples_per_prompt: int = knob(
        1, "Answers per prompt from each of policy and reference (more than 1 needs do_sample).", at_least(1)
    )
    judge: str = knob(
        "auto",
        "Who compares the policy's answer with the reference's: builtin (the built-in task's program), "
        "reward_model, pairwise (an LLM asked in both orders), none; auto: builtin on a built-in task, else none.",
        one_of(*JUDGES),
    )
    judge_model: JudgeModelParams = knob(help="The reward model or pairwise judge.", factory=JudgeModelParams)
    bootstrap_resamples: int = knob(
        1000, "Bootstrap resamples of the prompts for the win rate's confidence interval (seeded).", at_least(1)
    )
    confidence: float = knob(
        0.95, "Coverage of the win rate's bootstrap interval.", within(0, 1, low_open=True, high_open=True)
    )
    lm_eval: LmEvalParams = knob(help="The general-ability regression check.", factory=LmEvalParams)


@dataclass
class PushParams:
    enabled: bool = knob(False, "Upload the export to the Hub (token from HF_TOKEN).")
    repo_id: str | None = knob(None, "The Hub model repo, user/name.")
    private: bool = knob(True, "Create the repo private.")


@dataclass
class ExportParams:
    merge_adapter: bool = knob(True, "For an adapter: also write the full model with the adapter merged.")
    push: PushParams = knob(help="Optional Hub upload.", factory=PushParams)


@dataclass
class DistributedParams:
    num_processes: int = knob(
        1, "Processes per machine for ref-logps, train and evaluate (one per GPU); 1: no launcher.", at_least(1)
    )
    num_machines: int = knob(
        1, "Machines taking part; run the same command on each, with its machine_rank.", at_least(1)
    )
    machine_rank: int = knob(0, "This machine's rank, 0 .. num_machines-1 (0 hosts the rendezvous).", at_least(0))
    main_process_ip: str | None = knob(None, "Address of machine 0, needed with num_machines > 1; null: 127.0.0.1.")
    main_process_port: int = knob(29500, "Rendezvous port on machine 0.", within(1, 65535))
    mixed_precision: str | None = knob(
        None,
        "Passed to accelerate launch with config_file: no, fp16 or bf16; null: "
        "the config file's (train.bf16/fp16 decide otherwise).",
        one_of("no", "fp16", "bf16"),
    )
    config_file: str | None = knob(
        None,
        "An accelerate config file for FSDP or DeepSpeed (examples in "
        "configs/accelerate/); null: plain data parallelism through torchrun.",
    )


@dataclass
class HubParams:
    timeout_s: float = knob(
        HUB_TIMEOUT_S,
        "Seconds any Hub request (revision lookup, model or dataset download, "
        "the push) waits for a connection or an answer.",
        at_least(0.1),
    )
    tries: int = knob(
        HUB_TRIES,
        "Tries of the pipeline's own Hub requests (revision lookup, the push) on a "
        "time-out or a dropped connection, with a short growing pause; downloads are "
        "retried by huggingface_hub.",
        at_least(1),
    )


PAIRINGS = ("best_worst", "margin")  # judge_pairs.pairing (pipeline.judge.pairing)
PAIR_JUDGES = ("auto", "builtin", "reward_model")  # judge_pairs.judge: judges that give each answer a score
ROUND_PAIRS = ("generated", "original", "both")  # iterate.rounds.<k>.pairs
ROUND_KEYS = ("previous", "pairs", "original_pairs", "train")  # every round entry has each (its DVC params)


@dataclass
class GenerateParams:
    num_prompts: int | None = knob(
        256,
        "Distinct prompts of the train split answered (the first of a seeded shuffle); null: all.",
        at_least(1),
    )
    num_samples: int = knob(4, "Answers per prompt, sampled (the pairs are built among them).", at_least(2))
    temperature: float = knob(1.0, "Sampling temperature.", greater_than(0))
    top_p: float = knob(
        1.0, "Nucleus sampling: the smallest set of tokens with this much probability.", within(0, 1, low_open=True)
    )
    max_new_tokens: int = knob(24, "Tokens generated per answer.", at_least(1))
    batch_size: int = knob(
        32, "Prompts per generation batch; batch b of round r is seeded with seed + 1000 r + b.", at_least(1)
    )


@dataclass
class JudgePairsParams:
    judge: str = knob(
        "auto",
        "Who scores each generated answer: builtin (the built-in task's program) or reward_model (the "
        "sequence classifier of evaluate.judge_model); auto: builtin on the built-in task, else reward_model.",
        one_of(*PAIR_JUDGES),
    )
    pairing: str = knob(
        "best_worst",
        "best_worst: one pair per prompt, its best-scored answer over its worst; margin: every two answers whose "
        "scores differ by more than min_margin.",
        one_of(*PAIRINGS),
    )
    min_margin: float = knob(
        0.0, "A pair's chosen answer must score more than this above its rejected one.", at_least(0)
    )


@dataclass
class IterateParams:
    reference: str = knob(
        "previous",
        "The reference of round k: previous (round k-1's policy, the round's starting point) or initial (the "
        "model of round 0, every round).",
        one_of("previous", "initial"),
    )
    rounds: dict = knob(
        help="Iterative DPO (rounds/dvc.yaml): round name (quoted, e.g. '2') → {previous: the round before, or "
        "'0' for the initial model; pairs: generated | original | both; original_pairs: how many of the "
        "original train pairs (null: all) with original/both; train: train.* settings of this round}. "
        "Adding a round runs only it (docs/rounds.md).",
        factory=dict,
    )


SWEEP_METRICS = {  # sweep.metric: the eval metric successive halving ranks by → whether higher is better
    "loss": False,
    "rewards/accuracies": True,
    "rewards/margins": True,
    "win_rate": True,
}


@dataclass
class SweepParams:
    name: str = knob(
        "sweep",
        "The sweep's name: its state lives in artifacts/sweeps/<name>/, its configurations are the DVC experiments "
        "<name>-c1, <name>-c2, ...",
    )
    grid: dict = knob(
        help="Settings to sweep: a key (train.<option> or model.peft.<key>) → a list of two or more values; every "
        "combination is one configuration (docs/caching.md, Sweeps).",
        factory=dict,
    )
    configurations: list = knob(
        help="Further configurations, each a mapping key → value (the keys the grid takes), trained next to the "
        "grid's.",
        factory=list,
    )
    chunks: int = knob(
        4,
        "Each configuration's training steps cut into this many chunks; every live configuration trains one chunk, "
        "then all are evaluated and ranked, then the next.",
        at_least(1),
    )
    metric: str = knob(
        "loss",
        "The eval metric that ranks configurations: loss, rewards/accuracies, rewards/margins, or win_rate (the "
        "judge of evaluate.judge on sweep.judge_prompts held-out prompts).",
        one_of(*SWEEP_METRICS),
    )
    eta: int = knob(
        2,
        "Successive halving: at each rung keep the best 1/eta of the configurations there; 1: stop none.",
        at_least(1),
    )
    min_chunks: int = knob(1, "Chunks every configuration trains before any is stopped.", at_least(1))
    rung_chunks: int = knob(1, "Chunks between two rungs (ranking and stopping) after min_chunks.", at_least(1))
    judge_prompts: int = knob(
        64, "metric win_rate: held-out prompts each configuration answers at each chunk boundary.", at_least(1)
    )
    experiments: bool = knob(
        True,
        "Save every configuration as a DVC experiment (its params, curves and eval metrics) when the sweep ends.",
    )


@dataclass
class Params:
    seed: int = knob(0, "Seed of data generation, carving, initialisation and training.")
    model: ModelParams = knob(help="The base model, reference, adapters and loading options.", factory=ModelParams)
    data: DataParams = knob(help="The preference data and its validation.", factory=DataParams)
    tokenize: TokenizeParams = knob(help="Tokenization and truncation.", factory=TokenizeParams)
    ref_logps: RefLogpsParams = knob(help="The reference log-prob pass.", factory=RefLogpsParams)
    train: dict = knob(
        help="Any DPOConfig option (and TrainingArguments field), checked against DPOConfig.", factory=dict
    )
    evaluate: EvaluateParams = knob(help="Held-out evaluation.", factory=EvaluateParams)
    export: ExportParams = knob(help="Export and push.", factory=ExportParams)
    distributed: DistributedParams = knob(
        help="Processes and machines for ref-logps, train and evaluate.", factory=DistributedParams
    )
    hub: HubParams = knob(
        help="The network: time-out and tries of Hub requests (no stage's result depends on it).", factory=HubParams
    )
    generate: GenerateParams = knob(
        help="`dpo generate`: a policy's sampled answers to train prompts (iterative rounds).", factory=GenerateParams
    )
    judge_pairs: JudgePairsParams = knob(
        help="`dpo judge-pairs`: the generated answers scored and paired.", factory=JudgePairsParams
    )
    iterate: IterateParams = knob(help="Iterative DPO in cached rounds (rounds/dvc.yaml).", factory=IterateParams)
    sweep: SweepParams = knob(
        help="`dpo sweep`: configurations trained side by side in chunks, the losers stopped early (no stage reads "
        "it).",
        factory=SweepParams,
    )


# DPOConfig options whose one home in params.yaml is another section: the stage that owns them applies
# them once for every later stage (the tokenize stage truncates the data train and evaluate read).
OWNED_ELSEWHERE = {
    f.metadata["dpo_option"]: f"{section}.{f.name}"
    for section, schema in (
        ("model", ModelParams),
        ("data", DataParams),
        ("tokenize", TokenizeParams),
        ("ref_logps", RefLogpsParams),
    )
    for f in dataclasses.fields(schema)
    if "dpo_option" in f.metadata
}

# keys of the train section that are the train stage's own, not DPOConfig options
TRAIN_STAGE_KEYS = {
    "resume": "train.resume: true (continue from the newest complete checkpoint of this run's "
    "fingerprint; refuse when there is none), auto (the same, else start fresh; the "
    "default, also for null), false (start fresh) or a checkpoint path (refused if made "
    "for other params or inputs)"
}
TRAIN_STAGE_DEFAULTS = {"resume": "auto"}
# what the train section takes: every TrainingArguments field and DPO option (output_dir is the stage's)
TRAIN_KEYS = (set(TrainingArguments.__dataclass_fields__) | set(DPO_OPTIONS)) - {"output_dir"}


def dpo_default(name: str) -> Any:
    """The default of a DPOConfig option or TrainingArguments field, without building a DPOConfig."""
    if name in DPO_OPTIONS:
        return DPO_OPTIONS[name].default_value()
    if name in TRAINING_DEFAULTS:
        return TRAINING_DEFAULTS[name]
    f = TrainingArguments.__dataclass_fields__[name]
    return f.default_factory() if callable(f.default_factory) else f.default


# ---- checking a section against its dataclass -------------------------------------------------------

# where an unknown-key message sends the reader: docs/configuration.md's generated table of every key
# (reference_markdown)
KEYS_DOCUMENTED = (
    'every key is listed, with its default and meaning, in docs/configuration.md\'s "Every params.yaml key" table'
)


def did_you_mean(name: str, valid) -> str:
    """` (did you mean `beta`?)` for a near-miss of a valid key (difflib), else ''."""
    close = difflib.get_close_matches(str(name), sorted(map(str, valid)), n=3)
    if not close:
        return ""
    names = [f"`{c}`" for c in close]
    return f" (did you mean {' or '.join([', '.join(names[:-1]), names[-1]] if len(names) > 1 else names)}?)"


@functools.cache
def _hints(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def _alternatives(hint: Any) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _type_name(hint: Any) -> str:
    names = [getattr(a, "__name__", str(a)) if a is not type(None) else "null" for a in _alternatives(hint)]
    return " or ".join(names).replace("NoneType", "null")


def coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as the type `hint` names, reading strings the way argparse (HfArgumentParser) does."""
    options = _alternatives(hint)
    if value is None:
        if type(None) in options or hint is Any:
            return None
        raise PipelineError(f"params: {key} must be {_type_name(hint)}, got null.")
    for option in options:
        origin = typing.get_origin(option) or option
        if option is Any:
            return value
        if origin is bool:
            if isinstance(value, bool):
                return value
        elif origin in (int, float):
            if isinstance(value, bool):
                continue
            if isinstance(value, int) or (origin is float and isinstance(value, float)):
                return origin(value)
            if isinstance(value, str):
                try:
                    return origin(value)
                except ValueError:
                    continue
        elif origin is list:
            if isinstance(value, list):
                args = typing.get_args(option)
                return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
        elif origin is dict:
            if isinstance(value, dict):
                return value
        elif isinstance(origin, type) and isinstance(value, origin):
            return value
    raise PipelineError(f"params: {key} must be {_type_name(hint)}, got {value!r}.")


def check_section(raw: Any, schema: type, key: str) -> dict:
    """A section merged over its defaults, typed and checked field by field; unknown keys are refused."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PipelineError(f"params: {key or 'the file'} must be a mapping, got {type(raw).__name__}.")
    known = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        where = f"{key}." if key else ""
        raise PipelineError(
            f"params: unknown key {where}{unknown[0]}{did_you_mean(unknown[0], known)}; known keys of "
            f"{key or 'the top level'}: {sorted(known)}; {KEYS_DOCUMENTED}."
        )
    out = {}
    for name, f in known.items():
        dotted = f"{key}.{name}" if key else name
        hint = _hints(schema)[name]
        if dataclasses.is_dataclass(hint):
            out[name] = check_section(raw.get(name), hint, dotted)
            continue
        value = raw.get(name, f.default_factory() if callable(f.default_factory) else f.default)
        out[name] = value = coerce(value, hint, dotted)
        check(value, f.metadata.get("rule"), f"params: {dotted}", f.metadata.get("fix", ""))
    return out


# ---- the train section: its keys (its values: pipeline.config.train_params) --------------------------


def _refuse_credentials(keys, where: str) -> None:
    """params.yaml is recorded (manifests, the model card, DVC experiments, git): a credential never belongs there."""
    for key in sorted(set(keys) & credential_keys()):
        raise PipelineError(
            f"params: {where}.{key} holds a credential, and params.yaml is recorded in manifests, "
            f"the model card and git; remove it and set the HF_TOKEN environment variable instead "
            f"(the Hub token is read from there, or from `hf auth login`)."
        )


def _refuse_tokens(value: Any, where: str) -> None:
    """A Hub token pasted into any other field (e.g. train.run_name) would be recorded like a credential field, and
    reach the Trainer's pickled training_args.bin: refused, naming the key (never the value)."""
    if isinstance(value, str):
        if looks_like_token(value):
            raise PipelineError(
                f"params: {where} holds what looks like a Hugging Face token (hf_...), and params.yaml "
                f"is recorded in manifests, the model card and git; remove it and set the HF_TOKEN "
                f"environment variable instead (the Hub token is read from there, or from "
                f"`hf auth login`)."
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_tokens(key, f"a key of {where}")
            _refuse_tokens(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _refuse_tokens(item, f"{where}[{index}]")


def check_train_keys(train: dict) -> dict:
    """The train section's keys, checked by every stage before it runs: known (a DPOConfig option, a
    TrainingArguments field, or the stage's own `resume`), in their one home, and free of credentials. Its
    values are checked against DPOConfig itself by the stages that build one (`pipeline.config.train_params`)."""
    _refuse_credentials(train, "train")
    unknown = sorted(set(train) - TRAIN_KEYS - set(TRAIN_STAGE_KEYS))
    if unknown:
        raise PipelineError(
            f"params: unknown key train.{unknown[0]}"
            f"{did_you_mean(unknown[0], TRAIN_KEYS | set(TRAIN_STAGE_KEYS))}; train takes DPOConfig "
            f"options (e.g. beta, loss_type, learning_rate); {KEYS_DOCUMENTED}, and "
            f"`python -c 'import pipeline; help(pipeline.DPOConfig)'` documents every DPOConfig option."
        )
    for key in sorted(set(train) & set(OWNED_ELSEWHERE)):
        raise PipelineError(
            f"params: train.{key} belongs in {OWNED_ELSEWHERE[key]} in the pipeline (that stage applies "
            f"it for every later one); move it there."
        )
    resume = train.get("resume")
    if resume is not None and not isinstance(resume, (bool, str)):
        raise PipelineError(f"params: {TRAIN_STAGE_KEYS['resume']} (got {resume!r}).")
    options = {k: v for k, v in train.items() if k not in TRAIN_STAGE_KEYS}
    check_finite(options, name=lambda key: f"params: train.{key}")
    for key, (rule, fix) in field_rules().items():
        if key in options and not isinstance(options[key], str):  # a string is coerced, then checked, by DPOConfig
            try:
                check(options[key], rule, f"params: train.{key}", fix)
            except TypeError:
                raise PipelineError(f"params: train.{key} has the wrong type (got {options[key]!r}).") from None
    return train


def dpo_options(params: dict) -> dict:
    """The DPOConfig options params.yaml sets outside `train` (e.g. max_length from tokenize), by option name."""
    out = {}
    for option, home in OWNED_ELSEWHERE.items():
        section, name = home.split(".")
        out[option] = params[section][name]
    return out


def train_option(params: dict, name: str) -> Any:
    """The value a run uses for a DPOConfig option: params.yaml's, else DPOConfig's default."""
    if name in OWNED_ELSEWHERE:
        return dpo_options(params)[name]
    return params["train"].get(name, dpo_default(name))


# ---- the whole file ---------------------------------------------------------------------------------


def _check_models(params: dict) -> None:
    """Model, adapter and reference combinations that cannot work, refused before anything is loaded."""
    model, train = params["model"], params["train"]
    for key in ("model_init_kwargs", "ref_model_init_kwargs"):
        kwargs = model[key] or {}
        _refuse_credentials(kwargs, f"model.{key}")
        for dtype_key in ("dtype", "torch_dtype"):
            if dtype_key in kwargs:
                check(kwargs[dtype_key], dtype_name, f"params: model.{key}.{dtype_key}")
    if model["peft"]["enabled"] and model["adapter"]:
        raise PipelineError(
            "params: model.adapter continues a PeftModel and model.peft.enabled adds a new adapter "
            "(you passed a PeftModel and a peft_config): set model.peft.enabled: false to continue "
            "training the adapter, or model.adapter: null to train a new one."
        )
    adapters = model["peft"]["enabled"] or bool(model["adapter"])
    if model["quantization"]["load_in_4bit"] and not adapters:
        raise PipelineError(
            "params: model.quantization.load_in_4bit (QLoRA) trains an adapter on a frozen 4-bit base; "
            "set model.peft.enabled: true (or model.adapter) as well."
        )
    if train.get("sync_ref_model") and adapters and not model["ref_name_or_path"]:
        raise PipelineError(
            "params: train.sync_ref_model is not supported when training with PEFT models that do "
            "not keep a standalone ref_model; set model.ref_name_or_path or turn sync_ref_model off."
        )
    builtin = model["builtin"]
    if model["name_or_path"].startswith("builtin:") and model["name_or_path"] not in BUILTIN_MODELS:
        raise PipelineError(
            f"params: model.name_or_path {model['name_or_path']!r} is not a built-in model; the built-in "
            f"ones are {list(BUILTIN_MODELS)}."
        )
    if model["name_or_path"] in BUILTIN_MODELS and builtin["hidden_size"] % builtin["num_heads"]:
        raise PipelineError(
            f"params: model.builtin.hidden_size ({builtin['hidden_size']}) must be a multiple of "
            f"model.builtin.num_heads ({builtin['num_heads']}); e.g. hidden_size: "
            f"{builtin['num_heads'] * max(1, builtin['hidden_size'] // builtin['num_heads'])}."
        )


def _check_builtin_data(data: dict) -> None:
    """The built-in task makes a bounded number of distinct pairs: asking for more is refused before generating."""
    if str(data["train"]).startswith("builtin:") and data["train"] not in BUILTIN_DATASETS:
        raise PipelineError(
            f"params: data.train {data['train']!r} is not a built-in task; the built-in ones are "
            f"{list(BUILTIN_DATASETS)}."
        )
    if data["train"] != BUILTIN_DATA:  # the picture task draws a new picture per pair: no bound to check
        return
    for key, most in zip(("num_pairs", "num_eval_pairs"), split_capacities(data["eval_fraction"])):
        if data["builtin"][key] > most:
            raise PipelineError(
                f"params: data.builtin.{key} is {data['builtin'][key]}, but the built-in task can make "
                f"only {most} distinct pairs at data.eval_fraction {data['eval_fraction']}; set "
                f"data.builtin.{key} to at most {most}."
            )


def _check_evaluate(params: dict) -> None:
    """evaluate settings that contradict each other or the data, refused before any stage runs."""
    cfg, data = params["evaluate"], params["data"]["train"]
    if cfg["num_samples_per_prompt"] > 1 and not cfg["do_sample"]:
        raise PipelineError(
            f"params: evaluate.num_samples_per_prompt is {cfg['num_samples_per_prompt']}, but greedy answers "
            "(evaluate.do_sample: false) are all the same; set evaluate.do_sample: true, or num_samples_per_prompt: 1."
        )
    if cfg["judge"] == "builtin" and not str(data).startswith("builtin:"):
        raise PipelineError(
            f"params: evaluate.judge: builtin judges only the built-in tasks, and data.train is {data!r}; set "
            "evaluate.judge to reward_model or pairwise (with evaluate.judge_model.name_or_path), or none."
        )
    model = cfg["judge_model"]
    if cfg["judge"] in ("reward_model", "pairwise") and not model["name_or_path"]:
        raise PipelineError(
            f"params: evaluate.judge: {cfg['judge']} needs evaluate.judge_model.name_or_path (a "
            f"{'sequence-classification model' if cfg['judge'] == 'reward_model' else 'causal LM'}: a local "
            "directory or a Hub id)."
        )
    if model["template"] and cfg["judge"] != "pairwise":
        raise PipelineError(
            "params: evaluate.judge_model.template is the pairwise judge's prompt, but evaluate.judge is "
            f"{cfg['judge']}; set evaluate.judge: pairwise, or remove the template."
        )


def check_rounds(rounds: dict) -> None:
    """iterate.rounds: string names, in order, each entry naming the round before it (`previous`; the first names
    '0', the initial model) and holding every key of ROUND_KEYS (each is a DVC param of the round's stages)."""
    before = "0"
    for name, entry in rounds.items():
        key = f"iterate.rounds.{name}"
        if not isinstance(name, str) or name == "0":
            raise PipelineError(
                f"params: {key}: a round's name must be quoted text other than '0' (write '{name}':), so DVC can "
                "name its stages and params."
            )
        if not isinstance(entry, dict):
            raise PipelineError(f"params: {key} must be a mapping with the keys {list(ROUND_KEYS)}.")
        unknown = sorted(set(entry) - set(ROUND_KEYS))
        missing = [k for k in ROUND_KEYS if k not in entry]
        if unknown or missing:
            raise PipelineError(
                f"params: {key}: {'unknown key ' + unknown[0] if unknown else 'no ' + missing[0]}; every round "
                f"has exactly {list(ROUND_KEYS)} (each is a DVC param of its stages: write null or {{}} for none)."
            )
        if str(entry["previous"]) != before:
            raise PipelineError(
                f"params: {key}.previous is {entry['previous']!r} but the round before it is {before!r}; rounds run "
                "in the order written, each continuing the one before (the first continues '0', the initial model)."
            )
        check(entry["pairs"], one_of(*ROUND_PAIRS), f"params: {key}.pairs")
        if entry["original_pairs"] is not None:
            check(entry["original_pairs"], at_least(1), f"params: {key}.original_pairs")
        if not isinstance(entry["train"], dict):
            raise PipelineError(f"params: {key}.train must be a mapping of train.* settings ({{}} for none).")
        try:
            check_train_keys(entry["train"])
        except PipelineError as err:
            raise PipelineError(f"{err} (in {key}.train)") from None
        before = name


def round_params(params: dict, name: str | None) -> dict:
    """The params of round `name` of iterate.rounds: its train settings over the train section, and `round` (its
    name, its entry, its number in order from 1); unchanged for None (outside rounds)."""
    if name is None:
        return params
    rounds = params["iterate"]["rounds"]
    if name not in rounds:
        raise PipelineError(
            f"params: --round {name}: no such round in iterate.rounds (rounds: {list(rounds) or 'none'}); add it "
            "there or pick one of them."
        )
    entry = rounds[name]
    out = copy.deepcopy(params)
    out["train"] = {**out["train"], **entry["train"]}
    out["round"] = {"name": name, "number": list(rounds).index(name) + 1, **copy.deepcopy(entry)}
    return out


def check_params(raw: dict | None) -> dict:
    """Merge `raw` over the schema's defaults and validate it; returns the full, typed params (plain dicts)."""
    params = check_section(raw or {}, Params, "")
    check_train_keys(params["train"])
    _check_models(params)
    d = params["distributed"]
    if d["machine_rank"] >= d["num_machines"]:
        raise PipelineError(
            f"params: distributed.machine_rank is {d['machine_rank']} but distributed.num_machines is "
            f"{d['num_machines']}; machine ranks run from 0 to num_machines-1."
        )
    _check_builtin_data(params["data"])
    _check_evaluate(params)
    check_rounds(params["iterate"]["rounds"])
    push = params["export"]["push"]
    if push["enabled"] and not push["repo_id"]:
        raise PipelineError(
            "params: export.push.enabled is true but export.push.repo_id is not set; set it to "
            "'user/name' or turn the push off."
        )
    for section, value in params.items():
        _refuse_tokens(value, section)
    return params


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in lines:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"the key {key!r} is written twice (lines {lines[key]} and {key_node.start_mark.line + 1}); "
                    "YAML would keep the second silently: remove one",
                    key_node.start_mark,
                )
            lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_params(path: str | Path = "params.yaml", *checks: Callable[[dict], dict]) -> dict:
    """The params file merged over the defaults and checked (`check_params`), then through each of `checks` (a
    stage's own, e.g. `pipeline.config.train_params.check_train`); an error names the file."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: no such params file; run from the project root or pass --params.")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PipelineError(
            f"{path}: the params file cannot be read as text ({type(err).__name__}: {err}); it must be "
            "a UTF-8 YAML file (restore it with `git checkout`)."
        ) from None
    try:
        params = check_params(raw)
        for extra in checks:
            params = extra(params)
        return params
    except PipelineError as err:
        raise PipelineError(f"{path}: {err}") from None


def defaults() -> dict:
    return copy.deepcopy(check_params({}))


# ---- documentation ----------------------------------------------------------------------------------


def _rows(schema: type, prefix: str) -> list[tuple[str, Any, str]]:
    rows = []
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        hint = _hints(schema)[f.name]
        if dataclasses.is_dataclass(hint):
            rows += _rows(hint, key + ".")
        elif f.name != "train" or prefix:
            default = f.default_factory() if callable(f.default_factory) else f.default
            rows.append((key, default, f.metadata.get("help", "")))
    return rows


def reference_rows() -> list[tuple[str, Any, str]]:
    """(key, default, help) of every params.yaml key: the schema's sections, then the DPO options of `train`."""
    rows = _rows(Params, "")
    for name in DPO_OPTION_NAMES:
        if name in OWNED_ELSEWHERE:
            continue
        help_text = (
            DPO_OPTIONS[name].help
            if name in DPO_OPTIONS
            else TrainingArguments.__dataclass_fields__[name].metadata.get("help", "").replace("%%", "%")
        )  # argparse's escape
        rows.append((f"train.{name}", dpo_default(name), help_text))
    return rows


def reference_markdown() -> str:
    """docs/configuration.md's table of every key: generated from the schema, so the two cannot drift (a test
    compares)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, help_text in reference_rows():
        shown = yaml.safe_dump(default, default_flow_style=True, width=1000).strip().removesuffix("...").strip()
        lines.append(f"| `{key}` | `{shown}` | {help_text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
