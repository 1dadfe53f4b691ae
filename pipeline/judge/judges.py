"""The judges of evaluate.judge: each compares the policy's answer with the reference's answer to the same prompt.

A comparison's outcome is 1.0 (the policy's answer is better), 0.5 (a tie) or 0.0 (the reference's), or None when
the judge gave no usable verdict (counted and reported, never guessed). Two identical answers are a tie for every
judge, without asking it.

- `builtin`: the built-in task's program (`builtin.task.judge`, or the picture task's), a score per answer.
- `reward_model`: a sequence-classification model scores prompt + answer, rendered with the reward model's own chat
  template (plain prompt and answer text when it has none); the higher score wins.
- `pairwise`: a causal LM reads the prompt and both answers (`PAIRWISE_TEMPLATE`, or evaluate.judge_model.template)
  and answers A or B, greedily. It is asked in both orders: the policy wins a prompt only when both orders prefer
  it, and loses only when both prefer the reference; orders that disagree are a tie, so a judge that favours a
  position scores 0.5. A reply other than the letter (optionally in brackets or with a full stop) is unparseable,
  and the comparison has no outcome.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from pipeline.builtin import task
from pipeline.core.distributed import gather_shares, my_share
from pipeline.core.errors import PipelineError
from pipeline.data.images import open_image
from pipeline.data.processing import tokenizer_of
from pipeline.data.sources import is_builtin
from pipeline.judge.sampling import Sampling, generate_answers
from pipeline.model.loading import (
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    sequence_classifier_problem,
)
from pipeline.store.base_record import describe_source, load_revision

JUDGE_KEY = "evaluate.judge"
MODEL_KEY = "evaluate.judge_model.name_or_path"
TEMPLATE_KEY = "evaluate.judge_model.template"
PLACEHOLDERS = ("{prompt}", "{first}", "{second}")
PAIRWISE_TEMPLATE = """You compare two answers to the same request. Decide which answer is more helpful, correct \
and harmless; do not let the order or the length of the answers sway you.

Request:
{prompt}

Answer A:
{first}

Answer B:
{second}

Which answer is better? Reply with one letter: A or B."""
VERDICT = re.compile(r"\s*\(?([AB])\)?\.?\s*")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The policy's and the reference's answer to one held-out prompt (`{"prompt", "images"}`, prompt number
    `group`: with several samples per prompt, several comparisons share it)."""

    prompt: dict
    policy: str
    reference: str
    group: int


def outcome_of(policy_score: float, reference_score: float) -> float:
    return 1.0 if policy_score > reference_score else 0.5 if policy_score == reference_score else 0.0


def conversation_text(prompt: list[dict] | str) -> str:
    """A prompt as plain text for a judge: text as is, one user turn as its content, a longer conversation as
    `role: content` lines (an image as "[image]")."""
    if isinstance(prompt, str):
        return prompt

    def content(value) -> str:
        if isinstance(value, list):
            return " ".join("[image]" if p.get("type") == "image" else p.get("text", "") for p in value)
        return str(value)

    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return content(prompt[0]["content"])
    return "\n".join(f"{m['role']}: {content(m['content'])}" for m in prompt)


class BuiltinJudge:
    """The built-in task's program: a score per answer (the picture task's for a prompt with images)."""

    kind = "builtin"

    def score(self, prompt: dict, answer: str) -> float:
        if prompt.get("images"):
            from pipeline.builtin import vision_task

            return vision_task.judge(open_image(prompt["images"][0]), answer)
        return task.judge(prompt["prompt"], answer)

    def judge(self, comparisons: list[Comparison]) -> list[dict]:
        verdicts = []
        for c in comparisons:
            mine, theirs = self.score(c.prompt, c.policy), self.score(c.prompt, c.reference)
            verdicts.append({"policy_score": mine, "reference_score": theirs, "outcome": outcome_of(mine, theirs)})
        return verdicts


class RewardModelJudge:
    """A reward model: `scores` rates prompt + answer; the higher-rated answer of a comparison wins."""

    kind = "reward_model"

    def __init__(self, model, tokenizer, batch_size: int):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer_of(tokenizer), batch_size
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # the classifier pools at the last token before the padding
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def text(self, prompt: list[dict] | str, answer: str) -> str:
        """prompt + answer in the reward model's chat template (a text prompt as one user turn); without a
        template, the prompt's text and the answer on the next line."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            messages.append({"role": "assistant", "content": answer})
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return f"{conversation_text(prompt)}\n{answer}"

    @torch.no_grad()
    def scores(self, prompts: list[list[dict] | str], answers: list[str]) -> list[float]:
        """The reward of each (prompt, answer), in order; batches of `batch_size`, right-padded."""
        device = next(self.model.parameters()).device
        texts = [self.text(p, a) for p, a in zip(prompts, answers, strict=True)]
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "right"
        out = []
        try:
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                ).to(device)
                out += self.model(**batch).logits[:, 0].float().tolist()
        finally:
            self.tokenizer.padding_side = side
        return out

    def judge(self, comparisons: list[Comparison]) -> list[dict]:
        prompts = [c.prompt["prompt"] for c in comparisons]
        mine = self.scores(prompts, [c.policy for c in comparisons])
        theirs = self.scores(prompts, [c.reference for c in comparisons])
        return [
            {
                "policy_score": a,
                "reference_score": b,
                "outcome": 0.5 if c.policy == c.reference else outcome_of(a, b),
            }
            for c, a, b in zip(comparisons, mine, theirs)
        ]


def parse_verdict(reply: str) -> str | None:
    """ "A" or "B" when the reply is that letter alone (optionally "(A)" or "A."), else None: never guessed."""
    match = VERDICT.fullmatch(reply)
    return match.group(1) if match else None


def pairwise_outcome(first_order: str | None, second_order: str | None) -> float | None:
    """The outcome from the verdicts of both orders: first_order with the policy's answer as A, second_order with
    it as B. None when either verdict is unparseable."""
    if first_order is None or second_order is None:
        return None
    policy_first, policy_second = first_order == "A", second_order == "B"
    return 1.0 if policy_first and policy_second else 0.0 if not (policy_first or policy_second) else 0.5


class PairwiseJudge:
    """A causal LM asked which of two answers is better, in both orders."""

    kind = "pairwise"

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int,
        template: str = PAIRWISE_TEMPLATE,
        max_new_tokens: int = 4,
    ):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.sampling = Sampling(max_new_tokens=max_new_tokens, batch_size=batch_size)

    def question(self, prompt: list[dict] | str, first: str, second: str):
        """The judge's prompt: the template filled in, as one user turn when the judge has a chat template."""
        text = self.template
        for name, value in zip(PLACEHOLDERS, (conversation_text(prompt), first, second)):
            text = text.replace(name, value)
        if getattr(tokenizer_of(self.tokenizer), "chat_template", None):
            return [{"role": "user", "content": text}]
        return text

    def replies(self, questions: list) -> list[str]:
        asked = [{"prompt": q, "images": None} for q in questions]
        return [answers[0] for answers in generate_answers(self.model, self.tokenizer, asked, self.sampling)]

    def judge(self, comparisons: list[Comparison]) -> list[dict]:
        asked = [c for c in comparisons if c.policy != c.reference]
        questions = [self.question(c.prompt["prompt"], c.policy, c.reference) for c in asked]
        questions += [self.question(c.prompt["prompt"], c.reference, c.policy) for c in asked]
        replies = iter(self.replies(questions)) if questions else iter(())
        first = {id(c): next(replies) for c in asked}
        second = {id(c): next(replies) for c in asked}
        verdicts = []
        for c in comparisons:
            if c.policy == c.reference:
                verdicts.append({"outcome": 0.5, "replies": None})
                continue
            pair = (first[id(c)], second[id(c)])
            outcome = pairwise_outcome(parse_verdict(pair[0]), parse_verdict(pair[1]))
            verdicts.append({"outcome": outcome, "replies": list(pair)})
        return verdicts


def judged(judge, comparisons: list[Comparison]) -> list[dict]:
    """`judge`'s verdicts on every comparison, each process judging its share (as generation shares prompts)."""
    return gather_shares(judge.judge(my_share(comparisons)), len(comparisons))


# ---- choosing and loading the judge of params.yaml ---------------------------------------------------------


def judge_kind(params: dict) -> str:
    """evaluate.judge with `auto` resolved: builtin on a built-in task, else none."""
    kind = params["evaluate"]["judge"]
    if kind == "auto":
        return "builtin" if is_builtin(params["data"]["train"]) else "none"
    return kind


def read_template(path: str | None) -> str:
    """The pairwise template of evaluate.judge_model.template (the built-in one for null), with its placeholders."""
    if path is None:
        return PAIRWISE_TEMPLATE
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PipelineError(f"{TEMPLATE_KEY}={path}: cannot be read ({err}); give a UTF-8 text file.") from None
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise PipelineError(
            f"{TEMPLATE_KEY}={path}: the template lacks {', '.join(missing)}; it must contain {{prompt}}, "
            "{first} and {second} (the two answers), and ask for a one-letter verdict, A or B."
        )
    return text


def judge_source(params: dict) -> dict | None:
    """Where the judge model comes from, recorded like the base model (local file digests, or the Hub id and the
    commit it resolves to): the eval manifest keeps it, so a changed judge re-runs evaluate. None without one."""
    cfg = params["evaluate"]["judge_model"]
    if judge_kind(params) not in ("reward_model", "pairwise"):
        return None
    return describe_source(cfg["name_or_path"], cfg["revision"], MODEL_KEY, "evaluate.judge_model.revision")


def _kwargs(params: dict, source: dict) -> dict:
    kwargs = {
        "trust_remote_code": bool(params["model"]["trust_remote_code"]),
        **(params["model"]["model_init_kwargs"] or {}),
    }
    kwargs.pop("quantization_config", None)
    revision = load_revision(source)
    if revision:
        kwargs["revision"] = revision
    return kwargs


def check_judge(params: dict, source: dict | None) -> None:
    """Refuse, before any generation, a judge that cannot work: a reward model that is not a one-score sequence
    classifier, a pairwise template without its placeholders."""
    kind = judge_kind(params)
    if kind == "reward_model":
        problem = sequence_classifier_problem(source["source"], _kwargs(params, source))
        if problem:
            raise PipelineError(
                f"{MODEL_KEY}={params['evaluate']['judge_model']['name_or_path']}: {problem}; evaluate.judge: "
                "reward_model needs a sequence-classification model with one score (e.g. one trained by "
                "examples/train_reward_model.py); for a causal LM use evaluate.judge: pairwise."
            )
    if kind == "pairwise":
        read_template(params["evaluate"]["judge_model"]["template"])


def load_judge(params: dict, source: dict | None, device: torch.device | str):
    """The judge of evaluate.judge on `device`, or None for none."""
    kind, cfg = judge_kind(params), params["evaluate"]
    if kind == "none":
        return None
    if kind == "builtin":
        return BuiltinJudge()
    kwargs = _kwargs(params, source)
    tokenizer = load_tokenizer(
        source["source"], revision=kwargs.get("revision"), trust_remote_code=kwargs["trust_remote_code"]
    )
    if kind == "reward_model":
        model = load_sequence_classifier(source["source"], kwargs).to(device)
        return RewardModelJudge(model, tokenizer, cfg["batch_size"])
    model = load_causal_lm(source["source"], kwargs).to(device)
    template = read_template(cfg["judge_model"]["template"])
    return PairwiseJudge(model, tokenizer, cfg["batch_size"], template, cfg["judge_model"]["max_new_tokens"])
