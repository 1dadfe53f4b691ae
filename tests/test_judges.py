"""The judges of evaluate.judge: the pairwise judge asked in both orders with its verdict parsed strictly (a stub
causal LM built here, whose replies the test controls), the reward-model judge, and the refusals before any
generation (params, the judge model, the prompts file)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
from transformers.modeling_outputs import CausalLMOutputWithPast

from pipeline.builtin.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, word_level_tokenizer
from pipeline.config.params import check_params
from pipeline.core.errors import PipelineError
from pipeline.judge.judges import (
    Comparison,
    PairwiseJudge,
    RewardModelJudge,
    check_judge,
    judge_source,
    pairwise_outcome,
    parse_verdict,
    read_template,
)
from pipeline.judge.results import examples_of, figures
from pipeline.judge.sampling import prompts_file

WORDS = ["A", "B", "good", "bad", "maybe", "tell", "me", "about", "it", "the", "answer", "is"]


@pytest.fixture(scope="module")
def tokenizer():
    return word_level_tokenizer(WORDS, SPECIAL_TOKENS, CHAT_TEMPLATE)


class StubJudgeLM(LlamaForCausalLM):
    """A causal LM whose reply is `decide(ids of the question)` (a token), then the end-of-turn token."""

    decide = None

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        batch, length = input_ids.shape
        logits = torch.full((batch, length, self.config.vocab_size), -1e4)
        for i in range(batch):
            ids = (input_ids[i][attention_mask[i].bool()] if attention_mask is not None else input_ids[i]).tolist()
            answered = ids[-1] not in self.question_ends
            logits[i, -1, self.config.eos_token_id if answered else self.decide(ids)] = 0.0
        return CausalLMOutputWithPast(logits=logits)


def stub_judge(tokenizer, decide) -> PairwiseJudge:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = StubJudgeLM(config)
    model.generation_config.use_cache = False
    model.decide = decide
    model.question_ends = {tokenizer.convert_tokens_to_ids("<|assistant|>")}
    return PairwiseJudge(model, tokenizer, batch_size=3, template="{prompt} A: {first} B: {second}")


def comparisons(n: int = 6) -> list[Comparison]:
    prompt = {"prompt": [{"role": "user", "content": "tell me about it"}], "images": None}
    return [Comparison(prompt, "the answer is good", "the answer is bad", i) for i in range(n)]


def token(tokenizer, word: str) -> int:
    return tokenizer.convert_tokens_to_ids(word)


def test_a_judge_that_always_prefers_the_first_answer_gives_exactly_one_half(tokenizer):
    judge = stub_judge(tokenizer, lambda ids: token(tokenizer, "A"))
    verdicts = judge.judge(comparisons())
    assert [v["replies"] for v in verdicts] == [["A", "A"]] * 6  # both orders were asked
    assert [v["outcome"] for v in verdicts] == [0.5] * 6  # the orders disagree: all ties
    examples = examples_of(comparisons(), verdicts, [(4, 4)] * 6)
    assert figures(examples, resamples=200, confidence=0.95, seed=0)["win_rate"] == 0.5


def test_a_judge_that_reads_the_answers_counts_a_win_only_when_both_orders_agree(tokenizer):
    good, bad = token(tokenizer, "good"), token(tokenizer, "bad")

    def prefer_good(ids):  # the answer that says "good" wins, wherever it stands
        return token(tokenizer, "A" if ids.index(good) < ids.index(bad) else "B")

    verdicts = stub_judge(tokenizer, prefer_good).judge(comparisons(4))
    assert [v["replies"] for v in verdicts] == [["A", "B"]] * 4
    assert [v["outcome"] for v in verdicts] == [1.0] * 4
    flipped = [Comparison(c.prompt, c.reference, c.policy, c.group) for c in comparisons(4)]
    assert [v["outcome"] for v in stub_judge(tokenizer, prefer_good).judge(flipped)] == [0.0] * 4


def test_an_unparseable_verdict_is_counted_never_guessed(tokenizer):
    replies = iter([token(tokenizer, w) for w in ("maybe", "A", "A", "B")] * 3)
    judge = stub_judge(tokenizer, lambda ids: next(replies))
    judge.sampling = type(judge.sampling)(max_new_tokens=4, batch_size=1)  # one question at a time: a known order
    verdicts = judge.judge(comparisons(2))
    # questions: both comparisons in the first order ("maybe", "A"), then in the second ("A", "B")
    assert [v["outcome"] for v in verdicts] == [None, 1.0]
    examples = examples_of(comparisons(2), verdicts, [(4, 4)] * 2)
    result = figures(examples, resamples=100, confidence=0.95, seed=0)
    assert result["unparsed_verdicts"] == 1 and result["num_comparisons"] == 1 and result["win_rate"] == 1.0


def test_verdicts_are_parsed_strictly():
    assert [parse_verdict(r) for r in ("A", " B ", "(A)", "B.", "\nA\n")] == ["A", "B", "A", "B", "A"]
    assert [parse_verdict(r) for r in ("", "AB", "A because", "answer A", "a", "C", "A or B")] == [None] * 7
    assert pairwise_outcome("A", "B") == 1.0 and pairwise_outcome("B", "A") == 0.0
    assert pairwise_outcome("A", "A") == pairwise_outcome("B", "B") == 0.5
    assert pairwise_outcome(None, "B") is None and pairwise_outcome("A", None) is None


def test_identical_answers_are_a_tie_without_asking(tokenizer):
    asked = []
    judge = stub_judge(tokenizer, lambda ids: asked.append(ids) or token(tokenizer, "A"))
    same = [Comparison(c.prompt, c.policy, c.policy, c.group) for c in comparisons(3)]
    assert [v["outcome"] for v in judge.judge(same)] == [0.5] * 3 and asked == []


def test_the_reward_model_scores_each_answer_alone_as_in_any_batch(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    judge = RewardModelJudge(LlamaForSequenceClassification(config), tokenizer, batch_size=4)
    prompts = [[{"role": "user", "content": "tell me about it"}]] * 3
    answers = ["good", "the answer is bad bad bad", "maybe"]
    together = judge.scores(prompts, answers)
    alone = [judge.scores([p], [a])[0] for p, a in zip(prompts, answers)]
    assert together == pytest.approx(alone, abs=1e-5)  # right padding: pooled at each text's last token
    text = judge.text(prompts[0], "good")
    assert text.startswith("<s><|user|> tell me about it <|end|> <|assistant|> good")  # its own chat template
    verdicts = judge.judge([Comparison({"prompt": prompts[0]}, "good", "good", 0)])
    assert verdicts[0]["outcome"] == 0.5  # identical answers tie


def evaluate_params(**evaluate) -> dict:
    return check_params({"data": {"train": "data/pairs.jsonl"}, "evaluate": evaluate})


@pytest.mark.parametrize(
    "evaluate, named",
    [
        ({"judge": "gpt"}, "params: evaluate.judge must be one of"),
        ({"judge": "builtin"}, "evaluate.judge: builtin judges only the built-in tasks"),
        ({"judge": "reward_model"}, "evaluate.judge: reward_model needs evaluate.judge_model.name_or_path"),
        ({"judge": "pairwise"}, "evaluate.judge: pairwise needs evaluate.judge_model.name_or_path"),
        ({"num_samples_per_prompt": 3}, "evaluate.num_samples_per_prompt is 3, but greedy answers"),
        ({"judge": "none", "judge_model": {"template": "t.txt"}}, "evaluate.judge_model.template is the pairwise"),
        ({"top_p": 0}, "params: evaluate.top_p must be in (0, 1]"),
        ({"confidence": 1}, "params: evaluate.confidence must be in (0, 1)"),
    ],
)
def test_judge_settings_that_cannot_work_are_refused_naming_the_key(evaluate, named):
    with pytest.raises(PipelineError, match=named.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        evaluate_params(**evaluate)


def test_auto_picks_the_builtin_judge_on_the_builtin_task_and_none_elsewhere():
    from pipeline.judge.judges import judge_kind

    assert judge_kind(check_params({})) == "builtin"
    assert judge_kind(evaluate_params()) == "none"


def test_a_reward_model_judge_that_is_a_causal_lm_is_refused_before_generation(tmp_path, tokenizer):
    from conftest import write_builtin_model

    write_builtin_model(tmp_path / "lm")
    params = evaluate_params(judge="reward_model", judge_model={"name_or_path": str(tmp_path / "lm")})
    source = judge_source(params)
    assert set(source["source_files"]) >= {"config.json", "model.safetensors"}  # its identity, for the manifest
    with pytest.raises(PipelineError) as caught:
        check_judge(params, source)
    message = str(caught.value)
    assert f"evaluate.judge_model.name_or_path={tmp_path / 'lm'}" in message
    assert "not a sequence-classification model" in message and "LlamaForCausalLM" in message
    assert "evaluate.judge: pairwise" in message  # the fix for a causal LM


def test_a_missing_judge_directory_names_the_key(tmp_path):
    params = evaluate_params(judge="reward_model", judge_model={"name_or_path": str(tmp_path / "nowhere")})
    with pytest.raises(PipelineError, match="evaluate.judge_model.name_or_path=.*no such local directory"):
        judge_source(params)


def test_a_pairwise_template_needs_its_placeholders(tmp_path):
    path = tmp_path / "template.txt"
    path.write_text("Which is better, {first} or {second}?")
    with pytest.raises(PipelineError, match=r"evaluate.judge_model.template=.*lacks \{prompt\}"):
        read_template(str(path))
    path.write_text("{prompt}\n1: {first}\n2: {second}\nA or B?")
    assert read_template(str(path)).startswith("{prompt}")


def test_a_prompts_file_with_no_prompts_is_refused_naming_the_key(tmp_path):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("")
    with pytest.raises(PipelineError, match=r"evaluate.prompts=.*holds no prompts; add rows with a `prompt`"):
        prompts_file(str(empty), 10)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"question": "where is the prompt"}) + "\n")
    with pytest.raises(PipelineError, match=r"evaluate.prompts: .*bad.jsonl row 1: no `prompt` field"):
        prompts_file(str(bad), 10)
    with pytest.raises(PipelineError, match=r"evaluate.prompts=.*no such file"):
        prompts_file(str(tmp_path / "missing.jsonl"), 10)


def test_a_prompts_file_gives_text_and_chat_prompts_in_order(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Write a haiku."}, {"prompt": [{"role": "user", "content": "Hi"}]}, {"prompt": "Third"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p["prompt"] for p in prompts_file(str(path), 2)] == ["Write a haiku.", [{"role": "user", "content": "Hi"}]]


def test_the_api_judges_answers_in_process(tokenizer):
    from pipeline import PairwiseJudge as Exported
    from pipeline import compare_answers

    good, bad = token(tokenizer, "good"), token(tokenizer, "bad")
    judge = stub_judge(tokenizer, lambda ids: token(tokenizer, "A" if ids.index(good) < ids.index(bad) else "B"))
    assert isinstance(judge, Exported)
    prompts = ["tell me about it"] * 4
    result = compare_answers(
        judge, prompts, ["good", "bad", "good", "the answer is good"], ["bad"] * 3 + ["bad"], tokenizer
    )
    assert (result["wins"], result["losses"], result["ties"]) == (3, 0, 1)  # "bad" vs "bad": identical, a tie
    assert result["win_rate"] == 3.5 / 4 and result["win_rate_low"] <= result["win_rate"] <= result["win_rate_high"]
    assert result["policy_mean_length"] == 1.75 and result["reference_mean_length"] == 1.0
