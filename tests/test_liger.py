"""`use_liger_kernel=True`: the fused Liger DPO loss (pipeline.objective.liger) trains as the default route does —
the same
step-one loss, metrics (less entropy and mean_token_accuracy) and updated weights (fp32, ≤ 1e-5) for every loss type
Liger has, PEFT with its adapter-off reference, an untied output layer with a bias, a packed batch, a
mixture-of-experts router loss, and evaluation; what it cannot express is refused when the trainer is built."""

from __future__ import annotations

import datasets
import pytest
import torch

from conftest import random_pairs
from pipeline import DPOConfig, DPOTrainer
from pipeline.core.errors import PipelineError
from pipeline.model.collator import DataCollatorForPreference
from pipeline.objective.liger import LIGER_LOSS_TYPES
from pipeline.run.trainer import PAIR_METRICS

pytest.importorskip("liger_kernel")

CHUNK = 3  # positions per logits chunk of the Liger route: one pair per chunk, so every batch spans several
TOL = dict(rtol=1e-5, atol=1e-5)
NOT_UNDER_LIGER = {"entropy", "mean_token_accuracy"}  # Liger's fused loss computes neither


PAIRS = random_pairs()


def build(tokenizer, seed: int = 0, tied: bool = True, bias: bool = False):
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
    model = LlamaForCausalLM(config)
    if bias:  # an output layer with a bias: its logits at Liger's empty slots are the bias
        model.lm_head = torch.nn.Linear(32, len(tokenizer), bias=True)
        torch.nn.init.normal_(model.lm_head.bias, std=0.5)
    return model


def make_trainer(
    tmp_path, model, tokenizer, liger: bool, ref_model=None, peft_config=None, rows=PAIRS, data_collator=None, **options
):
    args = DPOConfig(
        **{
            "output_dir": str(tmp_path),
            "report_to": "none",
            "gradient_checkpointing": False,
            "disable_tqdm": True,
            "save_strategy": "no",
            "per_device_train_batch_size": len(rows),
            "beta": 0.5,
            "use_liger_kernel": liger,
            **options,
        }
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(rows),
        peft_config=peft_config,
        data_collator=data_collator,
    )
    if liger:
        trainer.logits_chunk_tokens = CHUNK
    return trainer


def step(trainer, train: bool = True, rows=PAIRS, lr: float = 1.0):
    """One step on `rows`: the loss, the metrics it logged and (train) every trainable weight after one plain
    gradient step, so the weights differ as the gradients do."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    model.train(train)
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    if train:
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr).step()
    else:
        with torch.no_grad():
            loss = trainer.compute_loss(model, batch)
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.item(), trainer.pop_metrics("train" if train else "eval"), weights


def assert_same(liger: tuple, default: tuple) -> None:
    (loss, metrics, weights), (want_loss, want_metrics, want_weights) = liger, default
    assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-5)
    assert set(PAIR_METRICS) | {"logits/chosen", "logits/rejected"} <= metrics.keys()
    assert metrics.keys() == want_metrics.keys() - NOT_UNDER_LIGER
    for name, value in metrics.items():
        assert value == pytest.approx(want_metrics[name], rel=1e-5, abs=1e-5), name
    assert weights.keys() == want_weights.keys()
    for name, weight in weights.items():
        torch.testing.assert_close(weight, want_weights[name], **TOL, msg=name)


def both_routes(tmp_path, tokenizer, build_model=build, train: bool = True, rows=PAIRS, **options):
    """The step of each route from the same initial weights, reference and batch: (Liger, default)."""
    ref_model = options.pop("ref_model", build_model(tokenizer, seed=1))
    return [
        step(
            make_trainer(tmp_path, build_model(tokenizer), tokenizer, liger, ref_model=ref_model, rows=rows, **options),
            train,
            rows,
        )
        for liger in (True, False)
    ]


def test_the_loss_types_are_the_ones_the_installed_liger_has():
    from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOLoss

    assert set(LIGER_LOSS_TYPES) == set(LigerFusedLinearDPOLoss._SUPPORTED_LOSS_TYPES)


@pytest.mark.parametrize("loss_type", LIGER_LOSS_TYPES)
def test_every_liger_loss_type_steps_as_the_default_route(tmp_path, tiny_tokenizer, loss_type):
    assert_same(*both_routes(tmp_path, tiny_tokenizer, loss_type=[loss_type], label_smoothing=0.1))


@pytest.mark.parametrize(
    "options",
    [
        {"build_model": lambda tokenizer, seed=0: build(tokenizer, seed, tied=False, bias=True), "loss_weights": [0.5]},
        {"padding_free": True},
        {"train": False, "loss_type": ["robust"], "label_smoothing": 0.2},
    ],
    ids=["untied_biased_head+loss_weights", "padding_free", "eval"],
)
def test_layouts_heads_weights_and_evaluation(tmp_path, tiny_tokenizer, options):
    assert_same(*both_routes(tmp_path, tiny_tokenizer, **options))


def test_mixture_of_experts_router_loss_is_added(tmp_path, tiny_tokenizer):
    from transformers import MixtralConfig, MixtralForCausalLM

    def mixtral(tokenizer, seed=0):
        torch.manual_seed(seed)
        return MixtralForCausalLM(
            MixtralConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
                num_local_experts=4,
                num_experts_per_tok=2,
                output_router_logits=True,
                pad_token_id=tokenizer.pad_token_id,
            )
        )

    # padded batches on both routes: the router's statistics depend on the layout (padding, a prompt run once)
    collator = DataCollatorForPreference(tiny_tokenizer.pad_token_id)
    liger, default = both_routes(tmp_path, tiny_tokenizer, build_model=mixtral, data_collator=collator)
    assert liger[1]["aux_loss"] > 0
    assert_same(liger, default)


def test_peft_with_the_adapter_off_reference(tmp_path, tiny_tokenizer):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainers = [
        make_trainer(tmp_path, build(tiny_tokenizer), tiny_tokenizer, liger, peft_config=lora)
        for liger in (True, False)
    ]
    for trainer in trainers:  # the same non-zero adapter, so that the policy differs from the reference
        with torch.no_grad():
            for name, param in trainer.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.3, generator=torch.Generator().manual_seed(hash(name) % 2**31))
        assert trainer.reference.kind == "adapter_off"
    liger, default = (step(trainer) for trainer in trainers)
    assert liger[2] and all("lora_" in name for name in liger[2])
    assert liger[1]["rewards/margins"] != 0
    assert_same(liger, default)
    assert_same(*(step(trainer, train=False) for trainer in trainers))


def test_a_training_run_logs_what_the_default_route_logs(tmp_path, tiny_tokenizer):
    """Through the Trainer's loop (on the CPU with Liger's model kernels off): the logged step, and the weights
    after an optimizer step."""
    ref_model = build(tiny_tokenizer, seed=1)
    runs = []
    for liger in (True, False):
        trainer = make_trainer(
            tmp_path / str(liger),
            build(tiny_tokenizer),
            tiny_tokenizer,
            liger,
            ref_model=ref_model,
            max_steps=1,
            logging_steps=1,
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=0,
            lr_scheduler_type="constant",
        )
        trainer.train()
        logged = dict(trainer.state.log_history[0])
        runs.append((logged.pop("loss"), logged, {n: p.detach() for n, p in trainer.model.named_parameters()}))
    (liger_loss, liger_logged, _), (default_loss, default_logged, _) = runs
    assert liger_logged.keys() == default_logged.keys() - NOT_UNDER_LIGER
    assert liger_logged["num_tokens"] == default_logged["num_tokens"] > 0
    assert_same(*runs)


def lm_head_lora():
    from peft import LoraConfig

    return LoraConfig(r=2, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"loss_type": ["ipo"]}, r"does not support loss_type 'ipo' .*sigmoid, hinge.*turn off use_liger_kernel"),
        ({"loss_type": ["sft"]}, r"does not support loss_type 'sft'"),
        ({"loss_type": ["aot"]}, r"does not support loss_type 'aot'"),
        ({"f_divergence_type": "js_divergence"}, r"f_divergence_type='js_divergence'.*reverse_kl.*turn off use_liger"),
        ({"use_weighting": True}, r"does not support use_weighting=True.*turn off use_weighting or turn off use_liger"),
        ({"ld_alpha": 0.5}, r"does not support ld_alpha.*ld_alpha=None or turn off use_liger_kernel"),
        ({"peft_config": "lm_head"}, r"model's output layer to be a plain torch.nn.Linear, not .*lm_head"),
        ({"rows": "with_reference_logps"}, r"carries precomputed ones \(ref_chosen_logps\); drop those columns"),
        ({"model": "scaled_logits"}, r"logits to be its output layer applied to its last hidden states"),
    ],
    ids=[
        "ipo",
        "sft",
        "aot",
        "f_divergence",
        "use_weighting",
        "ld_alpha",
        "lora_on_lm_head",
        "reference_columns",
        "transformed_logits",
    ],
)
def test_what_the_fused_loss_cannot_express_is_refused_at_construction(tmp_path, tiny_tokenizer, options, message):
    from transformers import LlamaForCausalLM

    class ScaledLogits(LlamaForCausalLM):  # its logits are not its head applied to its hidden states
        def forward(self, *args, **kwargs):
            outputs = super().forward(*args, **kwargs)
            outputs.logits = outputs.logits * 0.5
            return outputs

    model = build(tiny_tokenizer, tied=False)
    if options.pop("model", None):
        model = ScaledLogits(model.config)
    if options.pop("peft_config", None):
        options["peft_config"] = lm_head_lora()
    if options.pop("rows", None):
        options["rows"] = [dict(p, ref_chosen_logps=-5.0, ref_rejected_logps=-6.0) for p in PAIRS]
    with pytest.raises(PipelineError, match=message):
        make_trainer(tmp_path, model, tiny_tokenizer, True, **options)
