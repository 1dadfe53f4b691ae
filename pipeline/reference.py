"""The reference model of a DPO run: what it is (one resolver for the API and every stage) and the pass
that computes its log-probs over tokenized pairs, by `row_id`."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from .collator import DataCollatorForPreference
from .data.schema import REF_LOGPS_SCHEMA, SPLITS
from .data.tables import read_tokenized
from .errors import PipelineError
from .logps import token_logps
from .models import is_peft_model, load_explicit_reference, load_policy

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


def resolve_reference(policy: Model, *, explicit: Model | Callable[[], Model | None] | None = None,
                      new_adapter: bool = False, when: When = "training",
                      initial: Callable[[], Model] | None = None, precomputed: bool = False,
                      sync_ref_model: bool = False) -> Reference:
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
            raise PipelineError("model and ref_model are the same object; pass ref_model=None to use a frozen copy "
                                "of the initial policy, or a separate model instance.")
        return Reference("explicit", frozen(explicit), "explicit")
    if sync_ref_model and (new_adapter or is_peft_model(policy)):
        raise PipelineError("sync_ref_model=True is not supported with a PEFT model that keeps no standalone "
                            "ref_model; pass ref_model=... (model.ref_name_or_path) or turn sync_ref_model off.")
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
        policy, explicit=lambda: load_explicit_reference(base_dir, params),
        new_adapter=params["model"]["peft"]["enabled"] and is_peft_model(policy), when=when,
        initial=lambda: load_policy(base_dir, params, trainable=False), precomputed=precomputed,
        sync_ref_model=bool(params["train"].get("sync_ref_model")))


@torch.no_grad()
def reference_logps(reference: Reference, rows: list[dict], collator: DataCollatorForPreference,
                    batch_size: int, progress: bool = False) -> dict[str, list]:
    """Summed and per-token completion log-probs of chosen and rejected under `model`.

    `rows` hold `row_id`, `prompt_ids`, `chosen_ids`, `rejected_ids`. Rows are batched by length so
    little compute goes to padding; results come back in the input order.
    
    """
    model = reference.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt_ids"]) + max(len(rows[i]["chosen_ids"]), len(rows[i]["rejected_ids"])))
    results: dict[int, tuple] = {}
    batches: Iterable = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="reference log-probs", disable=not progress):
        index = order[start:start + batch_size]
        batch = collator([rows[i] for i in index])
        with reference.context():
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                           use_cache=False).logits[:, :-1]
        labels = batch["input_ids"][:, 1:].to(device)
        mask = batch["completion_mask"][:, 1:].to(device).bool()
        per_token = token_logps(logits, labels)
        n = len(index)
        for j, i in enumerate(index):
            chosen = per_token[j][mask[j]].tolist()
            rejected = per_token[n + j][mask[n + j]].tolist()
            results[i] = (sum(chosen), sum(rejected), chosen, rejected)
    if was_training:
        model.train()
    ordered = [results[i] for i in range(len(rows))]
    return {"row_id": [r["row_id"] for r in rows],
            "ref_chosen_logps": [r[0] for r in ordered], "ref_rejected_logps": [r[1] for r in ordered],
            "ref_chosen_token_logps": [r[2] for r in ordered], "ref_rejected_token_logps": [r[3] for r in ordered]}


def write_reference_logps(reference: Reference, tokenized_dir: Path, tokenizer, batch_size: int, out_dir: Path) -> dict:
    """The reference log-probs of every split of a tokenized artifact, as `<split>.parquet` in out_dir; returns
    the row counts."""
    reference.model.to("cuda" if torch.cuda.is_available() else "cpu")
    collator = DataCollatorForPreference(tokenizer.pad_token_id)
    rows = {}
    for split in SPLITS:
        table = read_tokenized(tokenized_dir, split)
        computed = reference_logps(reference, table.to_pylist(), collator, batch_size, progress=True)
        pq.write_table(pa.Table.from_pydict(computed, schema=REF_LOGPS_SCHEMA), Path(out_dir) / f"{split}.parquet")
        rows[split] = table.num_rows
    return rows
