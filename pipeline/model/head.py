"""Per-token log p(label) of a causal LM, and the metric diagnostics, chunk by chunk through its output layer.

The model runs its own forward asked for the last position's logits only (`logits_to_keep=1`), so adapters,
distributed wrappers and a mixture-of-experts router loss see an ordinary call; a hook on its body keeps the
last hidden states. The output layer then runs on the completion positions alone, `chunk_tokens` rows at a
time, inside an autograd Function that keeps no logits: its backward recomputes each chunk's. Nothing ever
holds `[2N, L, V]` logits, and the diagnostics (mean logit, entropy, argmax hit, WPO term) come out of the
same pass. The arithmetic over the vocabulary is `pipeline.model.logps`'s, shared with the plain path.

A model whose output is not its head applied to its body's last hidden states (logit scaling or
soft-capping, extra virtual tokens, no `logits_to_keep`) takes the plain path: full logits, with one log line.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from dataclasses import dataclass

import torch

from pipeline.model.attention import prefix_shared_mask
from pipeline.model.batch_layout import PACKED, PADDED, PREFIX_SHARED, BatchLayout
from pipeline.model.collator import PAIR_BATCH_KEYS
from pipeline.model.logps import label_logps, label_logps_backward, token_diagnostics, token_logps, vocab_diagnostics

logger = logging.getLogger(__name__)

LOGITS_PER_CHUNK = 2**25  # logits of one chunk: 128 MiB in float32 (220 tokens at a 151,936-token vocabulary)
# config fields of models whose forward transforms the head's logits (Gemma 2/3 soft-capping, Cohere, Granite)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
DIAGNOSTICS = ("mean_logit", "entropy", "hit", "wpo_term")


@dataclass
class TokenValues:
    """What a forward pass gives the losses and metrics, laid out `[2N, L-1]` (label-aligned, whatever the
    batch layout): log p(label) at the completion positions (the only ones read; the chunked path leaves the
    others 0), the diagnostics likewise when asked for, and a mixture-of-experts model's router load-balancing
    loss when it returns one."""

    logps: torch.Tensor
    diagnostics: dict[str, torch.Tensor] | None
    aux_loss: torch.Tensor | None


@dataclass(frozen=True)
class OutputLayer:
    body: torch.nn.Module  # runs to the last hidden states
    head: torch.nn.Module  # last hidden states → logits
    vocab_size: int

    def chunk_tokens(self, requested: int | None) -> int:
        return requested or max(1, LOGITS_PER_CHUNK // self.vocab_size)


def token_values(
    model: torch.nn.Module, inputs: dict, mask: torch.Tensor, diagnostics: bool = False, chunk_tokens: int | None = None
) -> TokenValues:
    """Per-token log-probs (and diagnostics) of the completion tokens `mask` ([2N, L-1]) of a collated batch
    (any layout of `pipeline.model.collator`): chunked through the output layer when the model
    allows it, else from its full logits. `chunk_tokens`: positions per chunk; None: LOGITS_PER_CHUNK logits."""
    layer = output_layer(model)
    if layer is None:
        return full_logits_values(model, inputs, diagnostics)
    with captured_output(layer.body) as captured:
        outputs = forward(model, inputs, logits_to_keep=1)
    hidden = last_hidden_state(captured)
    where, labels = completion_positions(inputs, mask)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, where)
    logps, diag = head_logps(rows, labels, layer.head, layer.chunk_tokens(chunk_tokens), diagnostics)
    return TokenValues(
        at_positions(mask, logps),
        {k: at_positions(mask, v) for k, v in diag.items()} if diagnostics else None,
        getattr(outputs, "aux_loss", None),
    )


def full_logits_values(model: torch.nn.Module, inputs: dict, diagnostics: bool = False) -> TokenValues:
    """The plain path: the model's full logits, then log-probs and diagnostics at every position (of a packed or
    prefix-shared batch: gathered into the per-sequence layout first)."""
    outputs = forward(model, inputs)
    if BatchLayout.of_batch(inputs) != PADDED:
        logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])[inputs["packed_index"]]
        labels = inputs["label_ids"]
    else:
        logits, labels = outputs.logits[:, :-1], inputs["input_ids"][:, 1:]
    per_token = token_logps(logits, labels)
    diag = token_diagnostics(logits, labels) if diagnostics else None
    if BatchLayout.of_batch(inputs) != PADDED:
        valid = inputs["packed_valid"].to(per_token.dtype)
        per_token = per_token * valid
        diag = {k: v * valid for k, v in diag.items()} if diag else None
    return TokenValues(per_token, diag, getattr(outputs, "aux_loss", None))


def forward(model: torch.nn.Module, inputs: dict, **kwargs):
    """The model on a collated batch (`pipeline.model.collator`): a padded one with its attention mask, a packed one
    with
    restarting position_ids alone, a prefix-shared one with position_ids and the mask `pipeline.model.attention` builds;
    the batch's other model inputs (a vision batch's pixel values) go along as they are."""
    kwargs.update(extra_model_inputs(inputs))
    kind = BatchLayout.of_batch(inputs)
    if kind == PREFIX_SHARED:
        mask = prefix_shared_mask(model, inputs)
        return model(
            input_ids=inputs["input_ids"],
            position_ids=inputs["position_ids"],
            attention_mask=mask,
            use_cache=False,
            **kwargs,
        )
    if kind == PACKED:
        return model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False, **kwargs)
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False, **kwargs)


def extra_model_inputs(inputs: dict) -> dict:
    """What a batch holds for the model beyond the token layout (`collator.PAIR_BATCH_KEYS`): e.g. pixel values."""
    return {key: value for key, value in inputs.items() if key not in PAIR_BATCH_KEYS}


def completion_positions(inputs: dict, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each completion position of `mask` (row-major, as `masked_scatter` fills), the index in the flattened
    `[rows·T]` positions of the batch as the model saw it of the output that predicts its label, and the label."""
    if BatchLayout.of_batch(inputs) != PADDED:
        return inputs["packed_index"][mask], inputs["label_ids"][mask]
    ids = inputs["input_ids"]
    rows, cols = mask.nonzero(as_tuple=True)
    where = rows * ids.shape[1] + cols
    return where, ids.reshape(-1)[where + 1]


def at_positions(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Values of the positions of `mask` (row-major) laid out in its shape, 0 elsewhere (differentiable)."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)


# ---- the chunked output layer ---------------------------------------------------------------------


def head_logps(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk_tokens: int, diagnostics: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """log p(label) of each row of `hidden` ([K, H]) under `head`, and the diagnostics when asked for, with at
    most `chunk_tokens` rows of logits alive at once, in the forward pass and in the backward pass."""
    if any(hasattr(p, "ds_id") for p in head.parameters()):
        return checkpointed_head_logps(hidden, labels, head, chunk_tokens, diagnostics)
    params = [p for p in head.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    logps, *diag = ChunkedHeadLogps.apply(hidden, labels, head, chunk_tokens, diagnostics, *params)
    return logps, dict(zip(DIAGNOSTICS, diag))


def checkpointed_head_logps(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk_tokens: int, diagnostics: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`head_logps` through ordinary autograd, each chunk under activation checkpointing (its logits recomputed in
    the backward pass, none kept): for a head whose parameters DeepSpeed ZeRO-3 partitions. Those are gathered by
    its hooks only while the head itself runs, and their gradients go through DeepSpeed's own hooks, so they
    cannot be inputs of `ChunkedHeadLogps`. The same values, and the same memory bound per chunk."""
    from torch.utils.checkpoint import checkpoint

    def chunk(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = head(h)
        logp, _ = label_logps(logits, y)
        diag = vocab_diagnostics(logits.detach(), y) if diagnostics else {}
        return (logp, *(diag[name] for name in DIAGNOSTICS if diag))

    parts = [
        checkpoint(chunk, h, y, use_reentrant=False) if torch.is_grad_enabled() else chunk(h, y)
        for h, y in zip(hidden.split(chunk_tokens), labels.split(chunk_tokens))
    ]
    logps = torch.cat([p[0] for p in parts])
    diag = {name: torch.cat([p[1 + i] for p in parts]) for i, name in enumerate(DIAGNOSTICS)} if diagnostics else {}
    return logps, diag


class ChunkedHeadLogps(torch.autograd.Function):
    """log p(label) = z_label − logsumexp z, z = head(hidden), a chunk of rows at a time. The forward keeps only
    the hidden states and each row's logsumexp; the backward recomputes a chunk's logits (under the forward's
    autocast) and sends ∂/∂z back through the head: for a plain `nn.Linear` as matrix products, the weight's
    accumulated in place, for any other head (a LoRA-wrapped one, say) by autograd. The diagnostics are outputs
    without gradient (WPO's weights and the metrics take none)."""

    @staticmethod
    def forward(ctx, hidden, labels, head, chunk_tokens, diagnostics, *params):
        logps, normalizers, diags = [], [], []
        for h, y in zip(hidden.split(chunk_tokens), labels.split(chunk_tokens)):
            logits = head(h)
            logp, normalizer = label_logps(logits, y)
            logps.append(logp)
            normalizers.append(normalizer)
            if diagnostics:
                diags.append(vocab_diagnostics(logits, y))
            del logits
        ctx.save_for_backward(hidden, labels, torch.cat(normalizers))
        # the parameters themselves, not saved copies (saved-tensor hooks such as activation offloading would hand
        # back other tensors): the backward differentiates the head's own computation with respect to them
        ctx.head, ctx.chunk_tokens, ctx.params = head, chunk_tokens, params
        ctx.autocast = autocast_state(hidden.device.type)
        diag = [torch.cat([d[name] for d in diags]) for name in DIAGNOSTICS] if diagnostics else []
        ctx.mark_non_differentiable(*diag)
        return (torch.cat(logps), *diag)

    @staticmethod
    def backward(ctx, grad_logps, *_):
        hidden, labels, normalizers = ctx.saved_tensors
        head, params, wants_hidden = ctx.head, ctx.params, ctx.needs_input_grad[0]
        trained = [(i, params[i]) for i, need in enumerate(ctx.needs_input_grad[5:]) if need]
        linear = type(head) is torch.nn.Linear
        grad_hidden = torch.zeros_like(hidden) if wants_hidden else None
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            with torch.autocast(**ctx.autocast), torch.set_grad_enabled(not linear):
                h = hidden[rows].detach().requires_grad_(wants_hidden and not linear)
                logits = head(h)
                grad_logits = label_logps_backward(logits, labels[rows], normalizers[rows], grad_logps[rows])
                backward = linear_backward if linear else autograd_backward
                grad_h = backward(head, h, logits, grad_logits, trained, grad_params, wants_hidden)
            if wants_hidden:
                grad_hidden[rows] = grad_h
            del logits, grad_logits, grad_h
        return (grad_hidden, None, None, None, None, *grad_params)


def linear_backward(head: torch.nn.Linear, h, logits, grad_logits, trained, grad_params, wants_hidden):
    """An `nn.Linear` head's chunk: ∂/∂W += gᵀh and ∂/∂b += Σ g accumulated in place (no [V, H] temporary unless
    autocast computes in another dtype than the parameter's); returns ∂/∂h = gW."""
    for i, param in trained:
        if grad_params[i] is None:
            grad_params[i] = torch.zeros_like(param)
        if param is head.weight and grad_logits.dtype == h.dtype == param.dtype:
            grad_params[i].addmm_(grad_logits.T, h)
        elif param is head.weight:
            grad_params[i].add_(torch.mm(grad_logits.T, h))  # in autocast's dtype, as autograd would compute it
        else:
            grad_params[i].add_(grad_logits.sum(0))
    return torch.mm(grad_logits, head.weight) if wants_hidden else None


def autograd_backward(head, h, logits, grad_logits, trained, grad_params, wants_hidden):
    """Any other head's chunk: autograd through the recomputed logits; the parameters' gradients accumulated."""
    grads = list(
        torch.autograd.grad(
            logits, ([h] if wants_hidden else []) + [param for _, param in trained], grad_logits, allow_unused=True
        )
    )
    grad_h = grads.pop(0) if wants_hidden else None
    for (i, _), grad in zip(trained, grads):
        if grad is not None:
            grad_params[i] = grad if grad_params[i] is None else grad_params[i].add_(grad)
    return grad_h


def autocast_state(device_type: str) -> dict:
    """The autocast settings in force, so the backward's recomputation runs as the forward did."""
    return {
        "device_type": device_type,
        "enabled": torch.is_autocast_enabled(device_type),
        "dtype": torch.get_autocast_dtype(device_type),
    }


# ---- finding the body and the head ------------------------------------------------------------------

_layers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → (its head, OutputLayer | None)


def output_layer(model: torch.nn.Module) -> OutputLayer | None:
    """The body/head split of `model` (a transformers causal LM, PEFT-wrapped or not, possibly inside a
    distributed wrapper), or None (the reason logged once) when its logits are not just its head applied to its
    body's last hidden states. Decided once per model and head (a replaced head, e.g. wrapped by an adapter, is
    looked at again): by its structure, then by one short probe forward whose last-position logits must equal the
    head applied to the hidden states the hook caught."""
    base, body, head = _parts(model)
    known = _layers.get(model)
    if known is None or known[0] is not head:
        layer, reason = _split(model, base, body, head)
        if layer is None:
            logger.warning("%s: %s; computing log-probs from full-vocabulary logits", type(model).__name__, reason)
        _layers[model] = known = (head, layer)
    return known[1]


def _parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module | None, torch.nn.Module | None]:
    """The transformers model inside `model` (unwrapped from distributed wrappers and PEFT), its body and its head."""
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    try:
        return base, base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return base, None, None


def _split(model, base, body, head) -> tuple[OutputLayer | None, str]:
    if not isinstance(head, torch.nn.Module) or not isinstance(body, torch.nn.Module) or body is base:
        return None, "no separate body and output layer found"
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return None, "its forward takes no logits_to_keep"
    config = getattr(base, "config", None)
    configs = {
        id(c): c for c in (config, config.get_text_config() if hasattr(config, "get_text_config") else None) if c
    }
    for name in LOGIT_TRANSFORMS:
        values = {getattr(c, name, None) for c in configs.values()} - {None, 1, 1.0}
        if values:
            return None, f"its config sets {name}={values.pop()} (the logits are transformed after the head)"
    return _probe(model, body, head)


@torch.no_grad()
def _probe(model: torch.nn.Module, body: torch.nn.Module, head: torch.nn.Module) -> tuple[OutputLayer | None, str]:
    device = next(model.parameters()).device
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    # in eval mode and on a forked RNG: the probe must not draw dropout masks a (resumed) run would otherwise draw
    with (
        evaluating(model),
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        captured_output(body) as captured,
    ):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=1).logits
    try:
        hidden = last_hidden_state(captured)
    except RuntimeError as err:
        return None, str(err)
    if hidden.shape[:2] != ids.shape:
        return None, f"its body's output has shape {tuple(hidden.shape)} for input {tuple(ids.shape)}"
    mine, theirs = head(hidden[:, -1:]).float(), logits.float()
    tol = 4 * torch.finfo(logits.dtype).eps
    if mine.shape != theirs.shape or not torch.allclose(mine, theirs, rtol=tol, atol=tol * float(theirs.abs().max())):
        return None, "its logits are not its head applied to its body's last hidden states"
    return OutputLayer(body, head, theirs.shape[-1]), ""


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """`model` in eval mode (dropout off) inside the block, then each module back in the mode it was in."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def captured_output(module: torch.nn.Module):
    """The output of `module`'s first call inside the block (a list that holds it once called)."""
    captured: list = []
    handle = module.register_forward_hook(
        lambda _module, _args, output: captured.append(output) if not captured else None
    )
    try:
        yield captured
    finally:
        handle.remove()


def last_hidden_state(captured: list) -> torch.Tensor:
    if not captured:
        raise RuntimeError("the model's body did not run inside its forward")
    output = captured[0]
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if hidden is not None else output[0]
