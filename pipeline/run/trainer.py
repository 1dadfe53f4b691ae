"""`DPOTrainer`: the Hugging Face `Trainer` with the DPO objective, its reference and its metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import PreTrainedModel, Trainer, TrainerCallback

from pipeline.config.dpo_config import DPOConfig
from pipeline.core.distributed import ready_for_forward
from pipeline.core.errors import PipelineError
from pipeline.data.prepare import as_dataset, input_vocab_size, prepare_dataset
from pipeline.data.processing import is_processor, tokenizer_of
from pipeline.model.batch_layout import BatchLayout
from pipeline.model.collator import DataCollatorForPreference, DataCollatorForVisionPreference
from pipeline.model.head import token_values
from pipeline.model.layout import batch_layout
from pipeline.model.loading import (
    disable_dropout,
    effective_weights,
    is_peft_model,
    is_quantized,
    is_vision_model,
    load_causal_lm,
    load_tokenizer,
    with_pad_token,
)
from pipeline.model.logps import sequence_logps, wpo_log_weights
from pipeline.objective import losses
from pipeline.objective.liger import check_liger_route, liger_dpo_loss, model_kernel_config
from pipeline.objective.reference import PRECOMPUTED, Reference, resolve_reference
from pipeline.run.reference_pass import add_reference_logps
from pipeline.store.hub import hub_token, push_failure, with_tries

logger = logging.getLogger(__name__)

PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def pair_metric_values(chosen_logps, rejected_logps, chosen_rewards, rejected_rewards) -> dict[str, tuple]:
    """(sum, number of pairs) of each of PAIR_METRICS, from per-pair log-probs c, r and rewards βρ⁺, βρ⁻ ([N])."""
    n = len(chosen_rewards)
    return {
        "rewards/chosen": (chosen_rewards.sum(), n),
        "rewards/rejected": (rejected_rewards.sum(), n),
        "rewards/margins": ((chosen_rewards - rejected_rewards).sum(), n),
        "rewards/accuracies": ((chosen_rewards > rejected_rewards).float().sum(), n),
        "logps/chosen": (chosen_logps.sum(), n),
        "logps/rejected": (rejected_logps.sum(), n),
    }


def term_metric_values(terms: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """(value, 1 batch) of each term of a combined objective: `loss/<loss_type>`, and a router's `aux_loss`."""
    return {(name if name == "aux_loss" else f"loss/{name}"): (value.detach(), 1) for name, value in terms.items()}


def has_image_column(dataset) -> bool:
    return bool({"image", "images"} & set(getattr(dataset, "column_names", None) or []))


def check_vision_inputs(datasets_: list, args: DPOConfig, model, processing_class) -> bool:
    """Whether the data has images (an `image`/`images` column); such data is refused with keep_end truncation
    (it cuts the prompt's start, where the images are), a text-only model, or a processing class that is not
    the model's processor."""
    if not any(has_image_column(d) for d in datasets_):
        return False
    if args.truncation_mode == "keep_end":
        raise PipelineError(
            "truncation_mode='keep_end' is not supported with a vision dataset (it would cut the image "
            "tokens at the start); use truncation_mode='keep_start' or max_length=None."
        )
    if not is_vision_model(model):
        raise PipelineError(
            "the dataset has an 'image'/'images' column but the model is text-only; use a "
            "vision-language model, or a text dataset without image columns."
        )
    if not is_processor(processing_class):
        raise PipelineError(
            f"the dataset has images but processing_class is a {type(processing_class).__name__}, not "
            "the model's processor; pass processing_class=AutoProcessor.from_pretrained(<model>) or "
            "leave it None (it is then loaded with the model)."
        )
    return True


def language_model_targets(model) -> list[str]:
    """The names of a vision-language model's linear layers inside its language model (not its output layer): what
    LoRA's `all-linear` means for such a model, so the vision encoder and the projector stay as they are."""
    body = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is body)
    return sorted(f"{prefix}.{name}" for name, module in body.named_modules() if isinstance(module, torch.nn.Linear))


MODEL_TAGS = ["dpo", "pipeline"]  # added to the trained model's tags (its Hub card's)
REF_CHECKPOINT_NAME = "ref_model.safetensors"
COUNTS_CHECKPOINT_NAME = "dpo_counts.json"  # the running counts a resumed run continues (num_tokens)


class SyncRefModelCallback(TrainerCallback):
    """TR-DPO: every `ref_model_sync_steps` optimizer steps, ref ← α·policy + (1−α)·ref.

    The moving reference is saved with every checkpoint, so a resumed run continues from it.
    """

    def __init__(self, trainer: "DPOTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.ref_model_sync_steps == 0:
            policy = self.trainer.accelerator.unwrap_model(self.trainer.model)
            mix_into_reference(self.trainer.ref_model, policy, args.ref_model_mixup_alpha)

    def on_save(self, args, state, control, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(checkpoint):
            from safetensors.torch import save_model

            save_model(self.trainer.ref_model, os.path.join(checkpoint, REF_CHECKPOINT_NAME))


@torch.no_grad()
def mix_into_reference(ref_model: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    if is_peft_model(policy):  # a PEFT policy mixes in its effective weights (base + adapter deltas), by name
        weights = effective_weights(policy)
        missing = [name for name, _ in ref_model.named_parameters() if name not in weights]
        if missing:
            raise PipelineError(
                f"sync_ref_model: the reference's weight {missing[0]!r} has no counterpart in the "
                "PEFT policy; the reference must be a plain model of the policy's architecture."
            )
        pairs = [(ref_param, weights[name]) for name, ref_param in ref_model.named_parameters()]
    else:
        pairs = list(zip(ref_model.parameters(), policy.parameters(), strict=True))
    for ref_param, param in pairs:
        if ref_param is param:  # a frozen weight shared by policy and reference: nothing to mix
            continue
        ref_param.mul_(1 - alpha).add_(param.detach().to(ref_param.dtype), alpha=alpha)


def _model_id(model) -> str:
    """The name a model was given by, or the one its config records."""
    return model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "model")


def _datasets(dataset) -> list:
    return [] if dataset is None else list(dataset.values()) if isinstance(dataset, dict) else [dataset]


def _has_reference_logps(dataset) -> bool:
    return "ref_chosen_logps" in (getattr(dataset, "column_names", None) or [])


class DPOTrainer(Trainer):
    """Trainer for Direct Preference Optimization (Rafailov et al., 2023) and its variants.

    `train_dataset`/`eval_dataset` may be raw preference datasets (standard or conversational,
    explicit or implicit prompt; tokenized here) or already tokenized ones with `prompt_ids`,
    `chosen_ids`, `rejected_ids` and, optionally, precomputed `ref_*` columns. `ref_model` is a model,
    a path or Hub id, None (the reference is then resolved by `pipeline.objective.reference.resolve_reference`), or
    an already resolved `Reference`.

    Log-probs and metrics are computed chunk by chunk through the output layer (`pipeline.model.head`), so no
    `[2N, L, V]` logits are ever held; `logits_chunk_tokens` sets the positions per chunk (None: sized by the
    vocabulary to LOGITS_PER_CHUNK logits).
    """

    logits_chunk_tokens: int | None = None
    requires_data: bool = True  # a trainer built with neither train_dataset nor eval_dataset is refused

    def __init__(
        self,
        model: str | PreTrainedModel | torch.nn.Module,
        ref_model: str | PreTrainedModel | Reference | None = None,
        args: DPOConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        peft_config: Any = None,
    ):
        """Build the trainer in five steps, each a method below: the model and its adapter, the data, the
        reference, the batch layout, the collator; then, with `precompute_ref_log_probs`, the reference pass."""
        args = self._checked_args(model, args, compute_metrics)
        model, processing_class = self._loaded(model, args, processing_class)
        train_dataset, eval_dataset = self._as_datasets(train_dataset, eval_dataset)
        # a vision-language model with its processor collates with pixels whatever the data at hand: evaluate and
        # predict may bring images later
        self.vision = check_vision_inputs([train_dataset, *_datasets(eval_dataset)], args, model, processing_class) or (
            is_vision_model(model) and is_processor(processing_class)
        )
        model = self._with_adapter(model, ref_model, peft_config, args)  # 1. the model and its adapter
        train_dataset, eval_dataset = self._tokenized(model, processing_class, args, train_dataset, eval_dataset)  # 2.
        reference = self._reference(model, ref_model, peft_config is not None, args, train_dataset, eval_dataset)  # 3.
        if args.disable_dropout:
            disable_dropout(model)
            if reference.standalone is not None:
                disable_dropout(reference.standalone)
        if args.use_liger_kernel:  # what the fused loss cannot express is refused here, not at the first step
            check_liger_route(args, model, reference, (train_dataset, *_datasets(eval_dataset)))
            args.liger_kernel_config = model_kernel_config(args)
        self._pad_token_id = tokenizer_of(processing_class).pad_token_id
        self.layout = BatchLayout()  # padded until the models are placed and probed
        default_collator = data_collator is None
        super().__init__(
            model=model,
            args=args,
            data_collator=self._collator(processing_class) if default_collator else data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.reference = self._placed_reference(reference)
        self.layout = self._probed_layout(args)  # 4. the batch layout, probed where the Trainer placed the models
        if default_collator:  # 5. the collator, in that layout
            self.data_collator = self._collator(processing_class, args.pad_to_multiple_of)
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(lambda: [0.0, 0.0]),
            "eval": defaultdict(lambda: [0.0, 0.0]),
        }
        self._num_tokens = 0
        if args.sync_ref_model:
            self.add_callback(SyncRefModelCallback(self))
        if args.precompute_ref_log_probs:
            self._precompute_reference(resolved_by_caller=isinstance(ref_model, Reference))

    @classmethod
    def _checked_args(cls, model, args: DPOConfig | None, compute_metrics) -> DPOConfig:
        """`args`, or the reference documentation's default DPOConfig (output to `<model name>-DPO`), refused when
        it is not a DPOConfig or asks for Liger where Liger cannot run."""
        if args is None:
            args = DPOConfig(output_dir=f"{str(_model_id(model)).split('/')[-1]}-DPO")
        if not isinstance(args, DPOConfig):
            raise PipelineError(f"args must be a DPOConfig, got {type(args).__name__}; build it with DPOConfig(...).")
        if args.use_liger_kernel:
            if compute_metrics is not None:
                raise PipelineError("use_liger_kernel=True does not support compute_metrics; drop one of them.")
            cls._require_liger()
        return args

    @staticmethod
    def _loaded(model, args: DPOConfig, processing_class) -> tuple[torch.nn.Module, Any]:
        """The policy (loaded with `model_init_kwargs` when given by name) and its tokenizer or processor (loaded
        from the model's name when not given), with a pad token."""
        model_id = _model_id(model)
        if isinstance(model, str):
            model = load_causal_lm(model, args.policy_init_kwargs())
        elif args.model_init_kwargs:
            warnings.warn("model_init_kwargs is ignored because model is already instantiated.", stacklevel=3)
        if processing_class is None:
            processing_class = load_tokenizer(
                model_id,
                revision=(args.model_init_kwargs or {}).get("revision"),
                trust_remote_code=args.trust_remote_code,
            )
        with_pad_token(processing_class, args.pad_token)
        return model, processing_class

    def _as_datasets(self, train_dataset, eval_dataset) -> tuple:
        """The datasets as `datasets` objects (a list of rows or a pandas frame is converted), refused when
        neither is given and the trainer needs data."""
        if train_dataset is None and eval_dataset is None and self.requires_data:
            raise PipelineError(
                "train_dataset is required: pass train_dataset=<a preference dataset> (to evaluate "
                "only, pass eval_dataset=... instead)."
            )
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: as_dataset(v, f"eval_dataset[{k}]") for k, v in eval_dataset.items()}
        else:
            eval_dataset = as_dataset(eval_dataset, "eval_dataset")
        return as_dataset(train_dataset, "train_dataset"), eval_dataset

    @staticmethod
    def _with_adapter(model: torch.nn.Module, ref_model, peft_config, args: DPOConfig) -> torch.nn.Module:
        """Step 1: the policy as it trains: with a new LoRA adapter when `peft_config` is given (on a 4-bit base:
        QLoRA), tagged for the Hub card; a quantized model without an adapter is refused."""
        if peft_config is not None:
            if is_peft_model(model):
                raise PipelineError(
                    "You passed a PeftModel and a peft_config: continue training the PeftModel without "
                    "peft_config, or pass the base model with peft_config to train a new adapter."
                )
            if ref_model is model:
                raise PipelineError(
                    "model and ref_model are the same object; pass ref_model=None to use the base "
                    "with the adapter off, or a separate model instance."
                )
            with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                if is_quantized(model):  # QLoRA: norms in fp32, input grads for checkpointing (idempotent)
                    model = prepare_model_for_kbit_training(
                        model, use_gradient_checkpointing=bool(args.gradient_checkpointing)
                    )
                if is_vision_model(model) and getattr(peft_config, "target_modules", None) in (
                    "all-linear",
                    "all_linear",
                ):
                    peft_config = dataclasses.replace(peft_config, target_modules=language_model_targets(model))
                model = get_peft_model(model, peft_config)
        if is_quantized(model) and not is_peft_model(model):
            raise PipelineError(
                "a 4-bit/8-bit quantized model cannot be fine-tuned directly; pass peft_config "
                "(QLoRA: train a LoRA adapter on the frozen quantized base)."
            )
        if is_peft_model(model) and args.gradient_checkpointing:
            # the frozen embeddings give no grad to the checkpointed blocks' inputs; the adapters need one
            model.enable_input_require_grads()
        tagged = model.get_base_model() if is_peft_model(model) else model
        if hasattr(tagged, "add_model_tags"):  # the Hub card and push_to_hub read them
            tagged.add_model_tags(MODEL_TAGS)
        return model

    def _tokenized(self, model, processing_class, args: DPOConfig, train_dataset, eval_dataset) -> tuple:
        """Step 2: the datasets tokenized and checked against the model's vocabulary (`_prepared`)."""
        self._vocab_size = input_vocab_size(model)
        self._prepare_args = (processing_class, args)
        train_dataset = self._prepared(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            return train_dataset, {k: self._prepared(v, f"eval_dataset[{k}]") for k, v in eval_dataset.items()}
        return train_dataset, self._prepared(eval_dataset, "eval_dataset")

    @staticmethod
    def _reference(model, ref_model, new_adapter: bool, args: DPOConfig, train_dataset, eval_dataset) -> Reference:
        """Step 3: the reference (`resolve_reference`). With precomputed log-probs it runs only before the first
        step, on the data that lacks them; nothing is kept for training."""
        if isinstance(ref_model, Reference):
            return ref_model
        if isinstance(ref_model, str):
            ref_model = load_causal_lm(ref_model, args.reference_init_kwargs())
        to_score = [d for d in (train_dataset, *_datasets(eval_dataset)) if not _has_reference_logps(d)]
        return resolve_reference(
            model,
            explicit=ref_model,
            new_adapter=new_adapter,
            when="before_training" if args.precompute_ref_log_probs else "training",
            precomputed=args.precompute_ref_log_probs and not to_score,
            sync_ref_model=args.sync_ref_model,
        )

    def _probed_layout(self, args: DPOConfig) -> BatchLayout:
        """Step 4: the batch layout every model that runs on the batches takes (prefix-shared, packed, else padded),
        probed where the Trainer placed the models (a FlexAttention model probed on the CPU would fall back). With
        images, padded: a model meets the pixel inputs in sequence order, and vision models compute their own
        position ids (multimodal rotary positions) that packed rows would contradict."""
        if self.vision:
            if args.prefix_sharing or args.packing or args.padding_free:
                logger.info(
                    "a vision-language model: padded batches (the prefix-shared and packed layouts are for text)"
                )
            return BatchLayout()
        models = list({id(m): m for m in (self.model, self.reference.model) if m is not None}.values())
        with contextlib.ExitStack() as ready:
            for m in models:
                ready.enter_context(ready_for_forward(m, args.device))
            return batch_layout(models, BatchLayout.of_options(args.prefix_sharing, args.packing, args.padding_free))

    def _precompute_reference(self, resolved_by_caller: bool) -> None:
        """The reference pass of `precompute_ref_log_probs`: the reference's log-probs added to the datasets; then
        the reference is PRECOMPUTED (the policy may change, the values stay). A reference that stays valid after
        training (a model of its own, the base with the adapter off) is kept to score data given to evaluate or
        predict later."""
        self.train_dataset = self.with_reference_logps(self.train_dataset)
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {k: self.with_reference_logps(v) for k, v in self.eval_dataset.items()}
        else:
            self.eval_dataset = self.with_reference_logps(self.eval_dataset)
        if not resolved_by_caller:
            self._later_reference = self.reference if self.reference.kind in ("explicit", "adapter_off") else None
            self.reference = PRECOMPUTED

    def _placed_reference(self, reference: Reference) -> Reference:
        """A standalone reference where it runs: on this process's device; under FSDP then sharded like the policy
        and prepared for evaluation (`Accelerator.prepare_model(..., evaluation_mode=True)`; FSDP2 shards a module
        on the device it finds it on). Under DeepSpeed ZeRO-3 a standalone reference is refused: precompute its
        log-probs, or use an adapter (its reference is the base)."""
        model = reference.standalone
        if model is None:
            return reference
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            raise PipelineError(
                "DeepSpeed ZeRO-3 with a reference model of its own (an online reference) is not "
                "supported; set precompute_ref_log_probs=True (the pipeline's default) or train a "
                "LoRA adapter (its reference is the base with the adapter off)."
            )
        model.to(self.args.device)
        if self.is_fsdp_enabled:
            return dataclasses.replace(reference, model=self.accelerator.prepare_model(model, evaluation_mode=True))
        return reference

    def _collator(self, processing_class, pad_to_multiple_of: int | None = None):
        """The default collator: for text in the layout chosen, for images the vision collator."""
        if self.vision:
            return DataCollatorForVisionPreference(self._pad_token_id, pad_to_multiple_of, processor=processing_class)
        return DataCollatorForPreference(self._pad_token_id, pad_to_multiple_of, **self.layout.options())

    @staticmethod
    def _require_liger() -> None:
        if importlib.util.find_spec("liger_kernel") is None:
            raise PipelineError(
                "use_liger_kernel=True needs the optional Liger Kernel: "
                "pip install 'dpo-pipeline[liger]', or set use_liger_kernel=False."
            )

    # ---- the reference --------------------------------------------------------------------------

    @property
    def ref_model(self) -> torch.nn.Module | None:
        """The reference as a model of its own (explicit, or a frozen copy of the initial policy); None when it is
        the policy with its adapter off, or when the log-probs are precomputed."""
        return self.reference.standalone

    # ---- the non-finite guard ----------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            self._nonfinite_loss = float(loss.detach().float().sum())
        return loss

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        """After each optimizer step: a NaN or infinite loss or gradient norm saves no checkpoint, and
        `max_nonfinite_steps` such steps in a row stop training with the step and the likely causes."""
        if getattr(self, "_nonfinite_checked", None) == self.state.global_step:  # the epoch's end: this step again
            return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)
        self._nonfinite_checked = self.state.global_step
        loss = getattr(self, "_nonfinite_loss", None)
        norm = float(grad_norm) if grad_norm is not None else None
        self._nonfinite_loss = None
        bad = loss is not None or (norm is not None and not math.isfinite(norm))
        if self.args.world_size > 1:  # every rank decides alike (a loss can be NaN on one rank only)
            bad = bool(self.accelerator.reduce(torch.tensor(float(bad), device=self.args.device), "max").item())
        if not bad:
            self._nonfinite_steps = 0
            return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)
        self._nonfinite_steps = getattr(self, "_nonfinite_steps", 0) + 1
        self.control.should_save = False  # never a checkpoint of weights a non-finite step may have made
        if self._nonfinite_steps >= self.args.max_nonfinite_steps:
            what = (
                f"the loss was {loss}"
                if loss is not None
                else f"the gradient norm was {norm}"
                if norm is not None and not math.isfinite(norm)
                else "another process's loss was not finite"
            )
            raise PipelineError(
                f"training stopped at step {self.state.global_step}: {what}, the {self._nonfinite_steps}. step in a "
                "row "
                f"with a NaN or infinite loss or gradient norm (max_nonfinite_steps={self.args.max_nonfinite_steps}). "
                "Likely causes: a learning_rate or beta too large, fp16 overflow (use bf16), or pairs whose log-probs "
                "overflow; lower them and re-run. Nothing was published; the last complete checkpoint is kept."
            )
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def train(self, *args, **kwargs):
        if not any(p.requires_grad for p in self.model.parameters()):
            raise PipelineError(
                "the model has no trainable parameters. To continue training a PEFT adapter, load it "
                "with PeftModel.from_pretrained(..., is_trainable=True); to train frozen weights, "
                "unfreeze them (requires_grad_(True))."
            )
        return super().train(*args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume: the Trainer restores policy/adapter (optimizer, scheduler and RNG follow); a TR-DPO reference
        and the token count too."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, REF_CHECKPOINT_NAME)
        if self.args.sync_ref_model and self.ref_model is not None and os.path.isfile(path):
            from safetensors.torch import load_model

            load_model(self.ref_model, path, device=str(self.args.device))
        counts = os.path.join(resume_from_checkpoint, COUNTS_CHECKPOINT_NAME)
        if os.path.isfile(counts):
            with open(counts) as f:
                self._num_tokens = int(json.load(f)["num_tokens"])

    def _save_checkpoint(self, model, trial) -> None:
        """A checkpoint also holds the token count (summed over ranks already), so num_tokens continues on resume."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            with open(os.path.join(folder, COUNTS_CHECKPOINT_NAME), "w") as f:
                json.dump({"num_tokens": self._num_tokens}, f)

    def with_reference_logps(self, dataset, reference: Reference | None = None):
        """Add precomputed reference log-prob columns (of `reference`, default the trainer's) to a tokenized dataset
        that lacks them."""
        if dataset is None or _has_reference_logps(dataset):
            return dataset
        reference = reference or self.reference
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        collator = self._collator(self.processing_class)
        if not self.vision:
            collator.padding_free = False  # rows of at most one length, as the layout would pack them
        with ready_for_forward(reference.model, self.args.device):
            return add_reference_logps(dataset, reference, collator, batch_size, chunk_tokens=self.logits_chunk_tokens)

    # ---- data given later: evaluate, predict ------------------------------------------------------

    def _prepared(self, dataset, name: str):
        """`dataset` as the constructor takes data: a list made a dataset, tokenized, invalid rows refused or dropped
        (args.on_invalid), non-empty; with precompute_ref_log_probs, an IterableDataset is refused."""
        import datasets

        processing_class, args = self._prepare_args
        dataset = prepare_dataset(
            as_dataset(dataset, name),
            processing_class,
            args.max_length,
            args.truncation_mode,
            args.dataset_num_proc,
            name,
            args.on_invalid,
            self._vocab_size,
        )
        if args.precompute_ref_log_probs and isinstance(dataset, datasets.IterableDataset):
            raise PipelineError(
                f"precompute_ref_log_probs=True is not supported with an IterableDataset ({name}); "
                "pass a map-style Dataset or set precompute_ref_log_probs=False."
            )
        return dataset

    def _prepared_later(self, dataset, name: str):
        """A dataset handed to evaluate/predict, prepared as the constructor's are, with reference log-probs when they
        are precomputed: from the reference if the trainer still has one that is valid (a model of its own, the base
        with the adapter off, or the policy before any training step), else refused with the ways out."""
        dataset = self._prepared(dataset, name)
        if not self.args.precompute_ref_log_probs or _has_reference_logps(dataset):
            return dataset
        reference = self.reference if self.reference.model is not None else getattr(self, "_later_reference", None)
        if reference is None and self.state.global_step == 0:
            reference = Reference("policy", self.model, "the initial policy (no step taken yet)")
        if reference is None:
            raise PipelineError(
                f"{name} has no reference log-probs, and with precompute_ref_log_probs=True the initial "
                "policy (the reference) is not kept once training has changed it: pass this dataset as "
                "the trainer's eval_dataset (its log-probs are precomputed then), add ref_chosen_logps/"
                "ref_rejected_logps columns (the ref-logps stage), or pass ref_model=... ."
            )
        return self.with_reference_logps(dataset, reference)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """`Trainer.evaluate`; a dataset given here (raw or tokenized, or a dict of them) is prepared as the
        constructor's are."""
        if eval_dataset is not None and not isinstance(eval_dataset, (str, dict)):
            eval_dataset = self._prepared_later(eval_dataset, "eval_dataset")
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        """`Trainer.predict` on a dataset prepared as the constructor's are; predictions are `[pairs, 2]`: the chosen
        and rejected rewards."""
        return super().predict(self._prepared_later(test_dataset, "test_dataset"), ignore_keys, metric_key_prefix)

    def push_to_hub(self, *args, **kwargs):
        """`Trainer.push_to_hub`, failing in a sentence: offline (HF_HUB_OFFLINE=1) at once, and any Hub or network
        error named with its fix (tried `hub.tries` times on a time-out); what output_dir holds is kept."""
        from huggingface_hub import constants

        repo = self.args.hub_model_id or os.path.basename(os.path.normpath(self.args.output_dir))
        if constants.HF_HUB_OFFLINE:
            raise PipelineError(
                f"push_to_hub: the Hub repo {repo!r} cannot be reached: offline mode is on "
                f"(HF_HUB_OFFLINE=1); unset it, with network access, to push. {self._kept()}"
            )
        try:
            return with_tries(
                f"pushing to the Hub repo {repo!r}", lambda: super(DPOTrainer, self).push_to_hub(*args, **kwargs)
            )
        except PipelineError as err:
            raise PipelineError(f"push_to_hub to the Hub repo {repo!r} failed: {err} {self._kept()}") from None
        except Exception as err:
            raise PipelineError(
                f"push_to_hub to the Hub repo {repo!r} failed: {push_failure(err, hub_token())} {self._kept()}"
            ) from None

    def _kept(self) -> str:
        """What a failed push leaves: the model saved in output_dir, or nothing yet (the repo is made before the
        save)."""
        out = self.args.output_dir
        if any(Path(out).glob("*.safetensors")) or any(Path(out).glob("*.bin")):
            return f"The model saved in {out} is intact."
        return f"No model was saved in {out} yet; trainer.save_model() keeps it locally."

    # ---- the objective --------------------------------------------------------------------------

    def _token_values(self, model, inputs: dict, diagnostics: bool) -> tuple[torch.Tensor, dict | None]:
        """Per-position log p(label) of the completion tokens, laid out [2N, L-1] whatever the batch layout
        (padded, packed or prefix-shared: `pipeline.model.collator`), plus the metric diagnostics (and, for a
        mixture-of-experts model that returns router logits, its load-balancing loss as `aux_loss`)."""
        values = token_values(
            model, inputs, inputs["completion_mask"][:, 1:].bool(), diagnostics, self.logits_chunk_tokens
        )
        diag = values.diagnostics
        if diag is not None and values.aux_loss is not None:
            diag["aux_loss"] = values.aux_loss
        return values.logps, diag

    def compute_loss(
        self, model, inputs: dict[str, torch.Tensor], return_outputs: bool = False, num_items_in_batch=None
    ):
        """One batch from collator to loss. `inputs` holds N pairs in the trainer's `BatchLayout` with
        `completion_mask` [2N, L] (rows 0..N-1 chosen, N..2N-1 rejected); the chunked head gives each completion
        token's log-prob [2N, L-1] without [2N, L, V] logits (`pipeline.model.head`); `sequence_logps` sums them per
        sequence (LD-DPO's α past the shorter completion); the reference's sums come precomputed with the batch or
        from its own forward; `dpo_objective` combines the loss types (docs/losses.md) into the scalar returned, and
        the rewards, log-probs and token diagnostics are recorded as this step's metrics."""
        if self.args.use_liger_kernel:
            return self._liger_compute_loss(model, inputs, return_outputs)
        args = self.args
        mode = "train" if model.training else "eval"
        mask = inputs["completion_mask"][:, 1:].bool()
        n = mask.shape[0] // 2
        with self._offloading(mode):
            per_token, diag = self._token_values(model, inputs, diagnostics=True)
        lengths = mask.sum(-1)
        shared = torch.minimum(lengths[:n], lengths[n:]).repeat(2)
        logps = sequence_logps(per_token, mask, args.ld_alpha, shared)
        ref_logps = self._reference_sequence_logps(inputs, mask, shared).to(logps.dtype)

        sft_nll = -(per_token[:n] * mask[:n]).sum() / mask[:n].sum().clamp(min=1)
        pair_weights = None
        if args.use_weighting:
            log_w = wpo_log_weights(diag, mask)
            pair_weights = torch.exp(log_w[:n] + log_w[n:])
        pair_logps = losses.PairLogps(
            logps[:n],
            logps[n:],
            ref_logps[:n],
            ref_logps[n:],
            chosen_lengths=lengths[:n],
            rejected_lengths=lengths[n:],
            sft_nll=sft_nll,
        )
        total, terms, chosen_rewards, rejected_rewards = losses.dpo_objective(
            args.loss_type, args.loss_weights, pair_logps, losses.LossSettings.of(args), pair_weights
        )
        aux_loss = diag.pop("aux_loss", None)
        if aux_loss is not None:  # a mixture-of-experts router's load-balancing loss
            total = total + args.router_aux_loss_coef * aux_loss
            terms["aux_loss"] = aux_loss
        self._record_metrics(
            mode, logps.detach(), chosen_rewards, rejected_rewards, diag, mask, n, terms if len(terms) > 1 else {}
        )
        if mode == "train":
            self._count_tokens(inputs)
        if return_outputs:
            return total, {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}
        return total

    def _liger_compute_loss(self, model, inputs: dict[str, torch.Tensor], return_outputs: bool):
        """compute_loss through Liger Kernel's fused linear DPO loss (`pipeline.objective.liger`), for the options
        `check_liger_route` let through. Logs the same metrics except `entropy` and `mean_token_accuracy`, which
        the fused loss does not compute (a second pass over the vocabulary would undo what it saves)."""
        mode = "train" if model.training else "eval"
        with self._offloading(mode):
            out = liger_dpo_loss(model, self.reference, inputs, self.args, self.logits_chunk_tokens)
        values = {
            **pair_metric_values(out.chosen_logps, out.rejected_logps, out.chosen_rewards, out.rejected_rewards),
            "logits/chosen": (out.chosen_logit_sum, out.chosen_tokens),
            "logits/rejected": (out.rejected_logit_sum, out.rejected_tokens),
            **term_metric_values(out.terms if len(out.terms) > 1 else {}),
        }
        self._accumulate_metrics(mode, values, out.chosen_rewards.device)
        if mode == "train":
            self._count_tokens(inputs)
        if return_outputs:
            return out.loss, {"chosen_rewards": out.chosen_rewards, "rejected_rewards": out.rejected_rewards}
        return out.loss

    def _offloading(self, mode: str) -> contextlib.AbstractContextManager:
        """Where the policy's forward runs: with activation_offloading, in training, its saved activations on the
        CPU."""
        if self.args.activation_offloading and mode == "train":
            return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
        return contextlib.nullcontext()

    def _count_tokens(self, inputs: dict) -> None:
        """num_tokens: the tokens of the pairs (prompt counted with each completion), whatever the layout ran."""
        tokens = inputs["num_tokens"] if "num_tokens" in inputs else inputs["attention_mask"].sum()
        self._num_tokens += int(self.accelerator.reduce(tokens.to(self.args.device), "sum").item())

    @torch.no_grad()
    def _reference_sequence_logps(self, inputs: dict, mask: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        if "ref_chosen_logps" not in inputs and self.reference.model is None:
            raise PipelineError(
                "precompute_ref_log_probs=True but this batch has no reference log-probs: pass datasets "
                "to the trainer's constructor (they are precomputed there) or use the ref-logps stage."
            )
        if "ref_chosen_logps" in inputs and (self.args.ld_alpha is None or "ref_token_logps" not in inputs):
            if self.args.ld_alpha is not None:
                raise PipelineError("ld_alpha needs per-token reference log-probs; re-run the ref-logps stage.")
            return torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        if "ref_token_logps" in inputs:
            per_token = inputs["ref_token_logps"][:, 1:]
        else:
            with self.reference.context():
                per_token, _ = self._token_values(self.reference.model, inputs, diagnostics=False)
        return sequence_logps(per_token, mask, self.args.ld_alpha, shared)

    # ---- metrics --------------------------------------------------------------------------------

    def _record_metrics(
        self,
        mode: str,
        logps,
        chosen_rewards,
        rejected_rewards,
        diag: dict,
        mask,
        n: int,
        terms: dict[str, torch.Tensor],
    ) -> None:
        """Accumulate (sum, count) per metric, reduced over ranks: pair metrics count pairs, token metrics tokens,
        the terms of a combined objective (`loss/<loss_type>`, a router's `aux_loss`) count batches."""
        m = mask.float()
        c, r = slice(0, n), slice(n, 2 * n)
        token_sum = lambda name, rows: (diag[name][rows] * m[rows]).sum()  # noqa: E731
        values = {
            **pair_metric_values(logps[c], logps[r], chosen_rewards, rejected_rewards),
            "logits/chosen": (token_sum("mean_logit", c), m[c].sum()),
            "logits/rejected": (token_sum("mean_logit", r), m[r].sum()),
            "entropy": (token_sum("entropy", slice(None)), m.sum()),
            "mean_token_accuracy": (token_sum("hit", c), m[c].sum()),
            **term_metric_values(terms),
        }
        self._accumulate_metrics(mode, values, chosen_rewards.device)

    def _accumulate_metrics(self, mode: str, values: dict[str, tuple], device) -> None:
        """Add each metric's (sum, count) of this batch, summed over ranks, to the running totals of `mode`."""
        flat = torch.tensor([[float(s), float(k)] for s, k in values.values()], device=device, dtype=torch.float64)
        flat = self.accelerator.reduce(flat, "sum").tolist()
        for name, (total, count) in zip(values, flat):
            acc = self._metrics[mode][name]
            acc[0] += total
            acc[1] += count

    def pop_metrics(self, mode: str) -> dict[str, float]:
        """The metrics accumulated since the last log, averaged; the accumulators are reset."""
        metrics = {name: total / count for name, (total, count) in self._metrics[mode].items() if count > 0}
        self._metrics[mode].clear()
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + name: value for name, value in self.pop_metrics(mode).items()})
        if mode == "train":
            logs["num_tokens"] = float(self._num_tokens)
            logs["global_step"] = self.state.global_step
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        logits = torch.stack([outputs["chosen_rewards"], outputs["rejected_rewards"]], dim=1)
        return loss.detach(), logits, torch.zeros(logits.shape[0], device=logits.device)


class DPOScorer(DPOTrainer):
    """A `DPOTrainer` that only scores: built without data, given its pairs by `evaluate`/`predict` (the evaluate
    stage's)."""

    requires_data = False
