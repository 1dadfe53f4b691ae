"""The chunked output layer (pipeline.model.head) gives the plain full-logits computation's numbers, values and
gradients (fp32, ≤ 1e-5), for every loss type and option, train and eval, plain and PEFT models, tied and
untied output layers; it never holds more than a chunk of logits; models it cannot split take the plain path."""

from __future__ import annotations

import contextlib
import logging

import datasets
import pytest
import torch

import pipeline.model.head
from conftest import random_pairs
from pipeline import DPOConfig, DPOTrainer
from pipeline.model.head import OutputLayer, head_logps, token_values
from pipeline.model.logps import label_logps, vocab_diagnostics
from pipeline.objective.losses import LOSS_TYPES

CHUNK = 3  # positions per chunk: every batch below spans several chunks, and one chunk crosses rows
TOL = dict(rtol=1e-5, atol=1e-5)


PAIRS = random_pairs()


def build(tokenizer, seed: int = 0, tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def make_trainer(tmp_path, model, tokenizer, ref_model=None, peft_config=None, **options) -> DPOTrainer:
    args = DPOConfig(
        **{
            "output_dir": str(tmp_path),
            "report_to": "none",
            "gradient_checkpointing": False,
            "disable_tqdm": True,
            "save_strategy": "no",
            "per_device_train_batch_size": 4,
            "beta": 0.5,
            **options,
        }
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(PAIRS),
        peft_config=peft_config,
    )
    trainer.logits_chunk_tokens = CHUNK
    return trainer


@contextlib.contextmanager
def plain_path(chunked: bool):
    """The full-logits path (what `output_layer` falls back to) unless `chunked`."""
    with pytest.MonkeyPatch.context() as patch:
        if not chunked:
            patch.setattr(pipeline.model.head, "output_layer", lambda model: None)
        yield


def step(trainer, chunked: bool, train: bool = True, rows=PAIRS):
    """One compute_loss on `rows`: the loss, the metrics it logged and (train) the gradient of every parameter."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    model.train(train)
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    with plain_path(chunked), contextlib.nullcontext() if train else torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        if train:
            loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), trainer.pop_metrics("train" if train else "eval"), grads


def assert_same_step(trainer, train: bool = True, rows=PAIRS) -> dict:
    loss, metrics, grads = step(trainer, chunked=True, train=train, rows=rows)
    want_loss, want_metrics, want_grads = step(trainer, chunked=False, train=train, rows=rows)
    assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    assert metrics.keys() == want_metrics.keys()
    for name, value in want_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert grads.keys() == want_grads.keys() and (grads or not train)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, **TOL, msg=name)
    return grads


CASES = [
    (loss, option)
    for loss in LOSS_TYPES
    for option in ("plain", "use_weighting", "ld_alpha")
    if not (option == "use_weighting" and loss.startswith("aot"))
]
OPTIONS = {"plain": {}, "use_weighting": {"use_weighting": True}, "ld_alpha": {"ld_alpha": 0.5}}


@pytest.mark.parametrize("loss_type,option", CASES)
def test_every_loss_type_and_option_gives_the_plain_values_and_gradients(tmp_path, tiny_tokenizer, loss_type, option):
    trainer = make_trainer(
        tmp_path,
        build(tiny_tokenizer),
        tiny_tokenizer,
        ref_model=build(tiny_tokenizer, seed=1),
        loss_type=[loss_type],
        label_smoothing=0.1,
        **OPTIONS[option],
    )
    assert_same_step(trainer)


@pytest.mark.parametrize(
    "options",
    [
        {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
        {"f_divergence_type": "forward_kl"},
        {"f_divergence_type": "js_divergence"},
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
        {"padding_free": True, "use_weighting": True, "ld_alpha": 0.3},
        {"gradient_checkpointing": True, "use_weighting": True},
        {"precompute_ref_log_probs": True, "ld_alpha": 0.5},
        {"activation_offloading": True, "use_weighting": True},
    ],
    ids=[
        "mpo",
        "forward_kl",
        "js_divergence",
        "alpha_divergence",
        "padding_free",
        "gradient_checkpointing",
        "precomputed_reference",
        "activation_offloading",
    ],
)
def test_combined_losses_transforms_layouts_and_precomputed_reference(tmp_path, tiny_tokenizer, options):
    trainer = make_trainer(
        tmp_path, build(tiny_tokenizer), tiny_tokenizer, ref_model=build(tiny_tokenizer, seed=1), **options
    )
    rows = trainer.train_dataset.to_list() if options.get("precompute_ref_log_probs") else PAIRS
    assert_same_step(trainer, rows=rows)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tied_and_untied_output_layers_train_and_evaluate_alike(tmp_path, tiny_tokenizer, tied):
    model = build(tiny_tokenizer, tied=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    trainer = make_trainer(tmp_path, model, tiny_tokenizer, use_weighting=True)  # reference: a frozen initial copy
    grads = assert_same_step(trainer)
    assert ("lm_head.weight" in grads) != tied and grads["model.embed_tokens.weight"].abs().sum() > 0
    assert_same_step(trainer, train=False)


@pytest.mark.parametrize(
    "target,offload",
    [("all-linear", False), ("lm_head", False), ("lm_head", True)],
    ids=["lora", "lora+lm_head", "lora+lm_head+offloading"],
)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_peft_models_and_their_adapter_off_reference(tmp_path, tiny_tokenizer, target, offload, tied):
    from peft import LoraConfig

    modules = "all-linear" if target == "all-linear" else ["q_proj", "v_proj", "lm_head"]
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=modules, task_type="CAUSAL_LM")
    trainer = make_trainer(
        tmp_path,
        build(tiny_tokenizer, tied=tied),
        tiny_tokenizer,
        peft_config=lora,
        ld_alpha=0.5,
        activation_offloading=offload,
    )
    with torch.no_grad():  # a non-zero adapter, so that the policy differs from the reference (adapter off)
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    assert trainer.reference.kind == "adapter_off"
    grads = assert_same_step(trainer)
    assert all("lora_" in name for name in grads)
    assert any("lm_head.lora_" in name for name in grads) == (target == "lm_head")
    assert_same_step(trainer, train=False)


def test_mixture_of_experts_router_loss_is_kept(tmp_path, tiny_tokenizer):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    trainer = make_trainer(tmp_path, MixtralForCausalLM(config), tiny_tokenizer, loss_type=["sigmoid", "sft"])
    _, metrics, _ = step(trainer, chunked=True)
    assert metrics["aux_loss"] > 0
    assert_same_step(trainer)


def test_reference_pass_streams_the_plain_values(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, build(tiny_tokenizer), tiny_tokenizer, precompute_ref_log_probs=True)
    chunked = trainer.train_dataset
    trainer.train_dataset = trainer.train_dataset.remove_columns(
        [c for c in chunked.column_names if c.startswith("ref_")]
    )
    from pipeline.objective.reference import resolve_reference

    trainer.reference = resolve_reference(trainer.model, when="before_training")
    with plain_path(False):
        plain = trainer.with_reference_logps(trainer.train_dataset)
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor(chunked[column]), torch.tensor(plain[column]), **TOL)
    for column in ("ref_chosen_token_logps", "ref_rejected_token_logps"):
        for got, want in zip(chunked[column], plain[column]):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), **TOL)


def test_no_more_than_a_chunk_of_logits_is_ever_computed(tmp_path, tiny_tokenizer):
    model = build(tiny_tokenizer, tied=False)
    trainer = make_trainer(tmp_path, model, tiny_tokenizer, use_weighting=True)
    rows = random_pairs(8, seed=1)
    batch = trainer.data_collator(rows)
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda _m, _a, out: shapes.append(tuple(out.shape)))
    try:
        step(trainer, chunked=True, rows=rows)
    finally:
        handle.remove()
    vocab, rows_in_batch = model.config.vocab_size, batch["input_ids"].shape[0]
    own = [s for s in shapes if len(s) == 3]  # the model's own call: the last position of each row only
    chunks = [s for s in shapes if len(s) == 2]
    assert own and all(s[1:] == (1, vocab) and s[0] in (1, rows_in_batch) for s in own)  # (1: the probe)
    assert chunks and all(s[0] <= CHUNK and s[1] == vocab for s in chunks)
    tokens = int(batch["completion_mask"][:, 1:].sum())  # forward, and recomputed in backward (the reference: a copy)
    assert sum(s[0] for s in chunks) == 2 * tokens


def test_default_chunk_bounds_the_logits_of_a_large_vocabulary():
    layer = OutputLayer(torch.nn.Identity(), torch.nn.Identity(), vocab_size=151_936)
    tokens = layer.chunk_tokens(None)
    assert 128 <= tokens and tokens * 151_936 * 4 <= 128 * 2**20  # float32 logits of a chunk: at most 128 MiB
    assert layer.chunk_tokens(7) == 7


def wrapped(linear: torch.nn.Linear) -> torch.nn.Module:
    """Not an `nn.Linear` itself (as a LoRA-wrapped head): its backward goes through autograd."""
    return torch.nn.Sequential(linear)


@pytest.mark.parametrize("kind", ["linear", "other"])
def test_head_arithmetic_against_a_double_precision_plain_computation(kind):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    labels = torch.randint(0, 50, (11,), generator=generator)
    linear = torch.nn.Linear(8, 50, bias=True).double()
    head = linear if kind == "linear" else wrapped(linear)
    weights = torch.randn(11, dtype=torch.float64, generator=generator)

    logps, diag = head_logps(hidden, labels, head, chunk_tokens=4, diagnostics=True)
    got = torch.autograd.grad((logps * weights).sum(), [hidden, linear.weight, linear.bias])
    logits = head(hidden)
    logp = torch.log_softmax(logits, -1)
    want_logps = logp.gather(-1, labels[:, None]).squeeze(-1)
    want = torch.autograd.grad((want_logps * weights).sum(), [hidden, linear.weight, linear.bias])
    torch.testing.assert_close(logps, want_logps.float(), rtol=1e-6, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)  # the vocabulary arithmetic runs in float32
    expected = {
        "mean_logit": logits.mean(-1),
        "entropy": -(logp.exp() * logp).sum(-1),
        "hit": (logits.argmax(-1) == labels).double(),
        "wpo_term": want_logps - torch.logsumexp(2 * logp, -1),
    }
    for name, value in expected.items():
        torch.testing.assert_close(diag[name].double(), value.detach(), rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["linear", "other"])
def test_backward_recomputes_under_the_forward_autocast(kind):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 40, (10,), generator=generator)
    linear = torch.nn.Linear(16, 40, bias=False)
    head = linear if kind == "linear" else wrapped(linear)
    dtypes = []
    linear.register_forward_hook(lambda _m, _a, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps, _ = head_logps(hidden, labels, head, chunk_tokens=4)
        want_logps = label_logps(head(hidden), labels)[0]
    got = torch.autograd.grad(logps.sum(), [hidden, linear.weight])
    want = torch.autograd.grad(want_logps.sum(), [hidden, linear.weight])
    assert dtypes == [torch.bfloat16] * 7  # 3 chunks forward, the plain call, 3 chunks recomputed in backward
    torch.testing.assert_close(logps, want_logps, rtol=1e-2, atol=1e-2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


def test_a_model_that_transforms_its_logits_takes_the_plain_path(tiny_tokenizer, caplog):
    from transformers import LlamaForCausalLM

    class ScaledLogits(LlamaForCausalLM):  # like Cohere's logit_scale, but undeclared in its config
        def forward(self, *args, **kwargs):
            outputs = super().forward(*args, **kwargs)
            outputs.logits = outputs.logits * 0.5
            return outputs

    model = build(tiny_tokenizer)
    scaled = ScaledLogits(model.config)
    scaled.load_state_dict(model.state_dict())
    from pipeline.model.collator import DataCollatorForPreference

    batch = DataCollatorForPreference(tiny_tokenizer.pad_token_id)(PAIRS)
    mask = batch["completion_mask"][:, 1:].bool()
    with caplog.at_level(logging.WARNING, logger="pipeline.model.head"):
        values = token_values(scaled, batch, mask, diagnostics=True)
    assert "full-vocabulary logits" in caplog.text and pipeline.model.head.output_layer(scaled) is None
    logits = scaled(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    want = label_logps(logits, batch["input_ids"][:, 1:])[0]
    torch.testing.assert_close(values.logps * mask, want * mask)
    assert pipeline.model.head.output_layer(model) is not None  # the same weights, untransformed: chunked

    model.config.final_logit_softcapping = 30.0  # declared in the config: refused without a probe
    assert pipeline.model.head._split(model, *pipeline.model.head._parts(model))[0] is None


def test_vocab_diagnostics_match_the_log_softmax_formulas():
    logits = torch.randn(3, 5, 1000, generator=torch.Generator().manual_seed(0)) * 4
    labels = torch.randint(0, 1000, (3, 5))
    diag = vocab_diagnostics(logits, labels)
    full = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(diag["entropy"].double(), -(full.exp() * full).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        diag["wpo_term"].double(),
        full.gather(-1, labels[..., None]).squeeze(-1) - torch.logsumexp(2 * full, -1),
        rtol=1e-5,
        atol=1e-5,
    )


def test_a_replaced_output_layer_is_looked_at_again(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = build(tiny_tokenizer, tied=False)
    assert pipeline.model.head.output_layer(model).head is model.lm_head
    get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head"], task_type="CAUSAL_LM"))  # wraps it in place
    assert type(model.lm_head) is not torch.nn.Linear
    assert pipeline.model.head.output_layer(model).head is model.lm_head


@pytest.mark.parametrize("diagnostics", [False, True])
def test_a_zero3_partitioned_head_takes_the_checkpointed_route_with_the_same_values_and_gradients(diagnostics):
    """DeepSpeed ZeRO-3 marks its partitioned parameters with `ds_id`; such a head cannot be an input of the
    autograd Function (its weights exist only inside its own call), so it runs through checkpointed autograd."""
    from pipeline.model.head import head_logps

    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64)
    labels = torch.randint(0, 50, (37,))
    results = []
    for partitioned in (False, True):
        torch.manual_seed(1)
        head = torch.nn.Linear(16, 50, dtype=torch.float64)
        torch.nn.init.normal_(head.weight)
        if partitioned:
            head.weight.ds_id = 0  # what ZeRO-3 sets on the parameters it partitions
        h = hidden.clone().requires_grad_(True)
        logps, diag = head_logps(h, labels, head, chunk_tokens=8, diagnostics=diagnostics)
        (logps * torch.linspace(0.5, 1.5, 37, dtype=torch.float64)).sum().backward()
        results.append(
            (logps.detach(), {k: v.detach() for k, v in diag.items()}, h.grad, head.weight.grad, head.bias.grad)
        )
    (want, want_diag, *want_grads), (got, got_diag, *got_grads) = results
    torch.testing.assert_close(got, want)
    assert set(got_diag) == set(want_diag) == (set(pipeline.model.head.DIAGNOSTICS) if diagnostics else set())
    for name in got_diag:
        torch.testing.assert_close(got_diag[name], want_diag[name])
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)
