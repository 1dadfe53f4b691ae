"""A controlled-sentiment preference task (after the IMDb experiment of the DPO paper, §6.1).

The user asks for a review of something; the preferred answer names it and praises it, the
dispreferred one names it and pans it. A program judges any answer, so evaluation can measure how
far DPO moved the policy: no human or reward model needed. Everything is seeded and offline.
"""

from __future__ import annotations

import random
import re

NOUNS = (
    "movie",
    "book",
    "song",
    "album",
    "meal",
    "hotel",
    "phone",
    "laptop",
    "game",
    "show",
    "car",
    "bike",
    "camera",
    "coffee",
    "pizza",
    "concert",
    "museum",
    "park",
    "course",
    "lecture",
    "play",
    "novel",
    "podcast",
    "restaurant",
    "garden",
    "beach",
    "train",
    "flight",
    "chair",
    "lamp",
    "jacket",
    "watch",
    "festival",
    "bakery",
    "library",
    "theater",
    "bridge",
    "tablet",
    "keyboard",
    "sofa",
)
PLACES = ("town", "city", "market", "north", "south", "station", "shop", "club", "school", "harbor")
POSITIVE = (
    "great",
    "wonderful",
    "delightful",
    "excellent",
    "charming",
    "superb",
    "lovely",
    "brilliant",
    "pleasant",
    "fantastic",
    "impressive",
    "enjoyable",
)
NEGATIVE = (
    "awful",
    "terrible",
    "dreadful",
    "boring",
    "dull",
    "poor",
    "horrible",
    "disappointing",
    "annoying",
    "bland",
    "mediocre",
    "unpleasant",
)
PROMPTS = (
    "Write a review of the {noun} from the {place} .",
    "What did you think of the {noun} from the {place} ?",
    "Tell me about the {noun} from the {place} .",
)
ANSWERS = (
    "The {noun} was {a} and {b} .",
    "I found the {noun} {a} , really {b} .",
    "Honestly the {noun} felt {a} and quite {b} .",
)
SYSTEM = "You are a helpful reviewer ."


def vocabulary() -> list[str]:
    """Every word the task can produce: the built-in tokenizer is word-level over exactly these."""
    words = {SYSTEM, *PROMPTS, *ANSWERS}
    tokens = {w for text in words for w in text.replace("{", " {").split() if not w.startswith("{")}
    return sorted(tokens | set(NOUNS) | set(PLACES) | set(POSITIVE) | set(NEGATIVE))


def prompt_messages(noun: str, place: str, template: int) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": PROMPTS[template].format(noun=noun, place=place)},
    ]


def answer(noun: str, rng: random.Random, positive: bool) -> str:
    a, b = rng.sample(POSITIVE if positive else NEGATIVE, 2)
    return rng.choice(ANSWERS).format(noun=noun, a=a, b=b)


def all_prompts() -> list[tuple[str, str, int]]:
    return [(n, p, t) for n in NOUNS for p in PLACES for t in range(len(PROMPTS))]


def split_prompts(seed: int, eval_fraction: float) -> tuple[list, list]:
    """Disjoint train/eval prompt sets, so held-out metrics are measured on unseen prompts."""
    prompts = all_prompts()
    random.Random(seed).shuffle(prompts)
    n_eval = max(1, int(len(prompts) * eval_fraction))
    return prompts[n_eval:], prompts[:n_eval]


def pair_capacity(num_prompts: int) -> int:
    """How many distinct pairs `preference_pairs` can make from `num_prompts` prompts: per prompt, every
    praising answer (a template and an ordered pair of adjectives) against every panning one."""

    def answers(adjectives: tuple) -> int:
        return len(ANSWERS) * len(adjectives) * (len(adjectives) - 1)

    return num_prompts * answers(POSITIVE) * answers(NEGATIVE)


def split_capacities(eval_fraction: float) -> tuple[int, int]:
    """The most distinct (train, eval) pairs the task can make at this eval_fraction (seed-independent)."""
    n_eval = max(1, int(len(all_prompts()) * eval_fraction))
    return pair_capacity(len(all_prompts()) - n_eval), pair_capacity(n_eval)


def preference_pairs(prompts: list, num_pairs: int, seed: int) -> list[dict]:
    """Conversational explicit-prompt pairs, all distinct: chosen praises the prompt's subject, rejected pans it.
    A pair drawn twice for the same prompt is drawn again (normalize refuses duplicates)."""
    if num_pairs > pair_capacity(len(prompts)):
        raise ValueError(f"{num_pairs} pairs asked, {pair_capacity(len(prompts))} distinct pairs possible")
    rng = random.Random(seed)
    rows, seen = [], set()
    for i in range(num_pairs):
        noun, place, template = prompts[i % len(prompts)]
        while True:
            chosen, rejected = answer(noun, rng, positive=True), answer(noun, rng, positive=False)
            if (i % len(prompts), chosen, rejected) not in seen:
                seen.add((i % len(prompts), chosen, rejected))
                break
        rows.append(
            {
                "prompt": prompt_messages(noun, place, template),
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return rows


def warmup_examples(prompts: list, num_examples: int, positive_fraction: float, seed: int) -> list[dict]:
    """Supervised examples for the base model: mostly pans, some praise, so the reference can
    produce both behaviours but prefers the dispreferred one (the room DPO has to improve)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_examples):
        noun, place, template = rng.choice(prompts)
        positive = rng.random() < positive_fraction
        rows.append(
            {
                "prompt": prompt_messages(noun, place, template),
                "completion": [{"role": "assistant", "content": answer(noun, rng, positive)}],
            }
        )
    return rows


def subject_of(messages: list[dict]) -> str | None:
    words = messages[-1]["content"].split()
    return next((w for w in words if w in NOUNS), None)


def _answer_pattern(template: str) -> re.Pattern:
    escaped = re.escape(template).replace(r"\{noun\}", r"(?P<noun>\w+)")
    return re.compile("^" + escaped.replace(r"\{a\}", r"(?P<a>\w+)").replace(r"\{b\}", r"(?P<b>\w+)") + "$")


ANSWER_PATTERNS = tuple(_answer_pattern(t) for t in ANSWERS)
MALFORMED = -3.0  # below any well-formed answer: degenerate text never wins


def judge(prompt: list[dict], completion: str) -> float:
    """Score an answer: well-formed review sentences get +1 per praising and −1 per panning
    adjective, +0.5 if they name the prompt's subject; anything else scores MALFORMED."""
    text = " ".join(completion.split())
    match = next((m for m in (p.match(text) for p in ANSWER_PATTERNS) if m), None)
    if match is None or match["noun"] not in NOUNS or not {match["a"], match["b"]} <= set(POSITIVE + NEGATIVE):
        return MALFORMED
    adjectives = (match["a"], match["b"])
    score = sum(a in POSITIVE for a in adjectives) - sum(a in NEGATIVE for a in adjectives)
    return score + (0.5 if match["noun"] == subject_of(prompt) else 0.0)


def win_rate(
    prompts: list[list[dict]], policy_answers: list[str], reference_answers: list[str]
) -> tuple[float, list[float]]:
    """Judged win rate of the policy over the reference; a tie counts as half a win."""
    outcomes = []
    for prompt, mine, theirs in zip(prompts, policy_answers, reference_answers, strict=True):
        a, b = judge(prompt, mine), judge(prompt, theirs)
        outcomes.append(1.0 if a > b else 0.5 if a == b else 0.0)
    return sum(outcomes) / max(1, len(outcomes)), outcomes
