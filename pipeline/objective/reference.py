"""The reference model of a DPO run: what it is, decided by one resolver for the API and every stage (the pass
that computes its log-probs over tokenized pairs is `pipeline.run.reference_pass`)."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch

from pipeline.core.errors import PipelineError
from pipeline.model.loading import is_peft_model, load_explicit_reference, load_policy, reference_is_adapter_off

Model = torch.nn.Module
When = Literal["training", "before_training", "after_training"]


@dataclass(frozen=True)
class Reference:
    """The resolved reference: `kind` says what it is, `model` is what to run (None: log-probs precomputed).

    kinds: "explicit" (a model of its own), "adapter_off" (the policy with its new adapter disabled: no second
    model), "initial_copy" (a frozen copy of the initial policy, sharing its frozen weights), "policy" (the
    initial policy itself, used before it changes), "initial" (the initial policy loaded again, after
    training), "precomputed" (nothing to run).
    """

    kind: str
    model: Model | None
    description: str

    def context(self) -> contextlib.AbstractContextManager:
        """What the reference's forward passes run inside: for "adapter_off", the policy's adapter disabled."""
        return self.model.disable_adapter() if self.kind == "adapter_off" else contextlib.nullcontext()

    @property
    def standalone(self) -> Model | None:
        """The reference as a model separate from the policy, if it is one (saved with TR-DPO checkpoints)."""
        return self.model if self.kind in ("explicit", "initial_copy", "initial") else None


PRECOMPUTED = Reference("precomputed", None, "precomputed log-probs")


def frozen(model: Model) -> Model:
    model.eval()
    model.requires_grad_(False)
    return model


def initial_policy_copy(model: Model) -> Model:
    """A frozen copy of `model` as it is now.

    Parameters the policy does not train (requires_grad False: a PEFT model's base weights, any frozen
    layer) are shared, not copied: they never change, so the copy of a PeftModel holds only a second
    copy of the adapter, and the base weights stay in memory once.
    """
    shared = {id(p): p for p in model.parameters() if not p.requires_grad}
    return frozen(copy.deepcopy(model, memo=shared))


def resolve_reference(
    policy: Model,
    *,
    explicit: Model | Callable[[], Model | None] | None = None,
    new_adapter: bool = False,
    when: When = "training",
    initial: Callable[[], Model] | None = None,
    precomputed: bool = False,
    sync_ref_model: bool = False,
) -> Reference:
    """The one decision of what the reference is, in this order:

    1. `precomputed`: nothing to run; the log-probs come with the data.
    2. `explicit`: a given model (or a loader, called only here; it may return None for "none given").
    3. `new_adapter` (the policy carries a new adapter): the policy with its adapter off.
    4. the initial policy: the policy itself `before_training`; a frozen copy of it while `training` (a
       continued adapter's copy is the starting adapter on the shared base weights); `initial()` loaded
       again `after_training`.

    `sync_ref_model` (TR-DPO) mixes the policy into the reference, so it needs a standalone one.
    """
    if precomputed:
        return PRECOMPUTED
    if callable(explicit) and not isinstance(explicit, Model):
        explicit = explicit()
    if explicit is not None:
        if explicit is policy:
            raise PipelineError(
                "model and ref_model are the same object; pass ref_model=None to use a frozen copy "
                "of the initial policy, or a separate model instance."
            )
        return Reference("explicit", frozen(explicit), "explicit")
    if sync_ref_model and (new_adapter or is_peft_model(policy)):
        raise PipelineError(
            "sync_ref_model=True is not supported with a PEFT model that keeps no standalone "
            "ref_model; pass ref_model=... (model.ref_name_or_path) or turn sync_ref_model off."
        )
    if new_adapter:
        return Reference("adapter_off", policy, "base (the policy with its adapter off)")
    description = "starting adapter" if is_peft_model(policy) else "base"
    if when == "before_training":
        return Reference("policy", policy, description)
    if when == "training":
        return Reference("initial_copy", initial_policy_copy(policy), description)
    if initial is None:
        raise ValueError("after training, the initial policy must be loaded again: pass initial=")
    return Reference("initial", frozen(initial()), description)


def stage_reference(base_dir: Path, params: dict, policy: Model, when: When, precomputed: bool = False) -> Reference:
    """`resolve_reference` for a stage: the explicit model and the initial policy come through the base artifact."""
    return resolve_reference(
        policy,
        explicit=lambda: load_explicit_reference(base_dir, params),
        new_adapter=reference_is_adapter_off(params, base_dir) and is_peft_model(policy),
        when=when,
        initial=lambda: load_policy(base_dir, params, trainable=False),
        precomputed=precomputed,
        sync_ref_model=bool(params["train"].get("sync_ref_model")),
    )
