"""A judged vision preference task, "vision-colors": name the colour that fills most of a picture.

Each image is painted in one palette colour and partly covered by one or two rectangles of other
palette colours (a random layout per image), so the named colour always covers most of the pixels.
The preferred answer names that colour, the dispreferred one another colour. A program reads the
colour back from the pixels (`dominant_color`) and judges any answer, so evaluation needs no human
or reward model. Everything is seeded, offline, pure Python and PIL.
"""

from __future__ import annotations

import random
import re

from PIL import Image, ImageDraw

IMAGE_SIZE = 32
MIN_DOMINANT_FRACTION = 0.55  # the named colour covers at least this share of the pixels
MIN_OTHER_FRACTION = 0.15  # ... and the other colours at least this share, so no image is a flat swatch

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 10),
    "yellow": (245, 230, 40),
    "green": (40, 170, 60),
    "blue": (30, 70, 220),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOR_NAMES = tuple(COLORS)
# The warm-started base model's systematic mistake: each colour is mostly called the next one.
CONFUSION = {name: COLOR_NAMES[(i + 1) % len(COLOR_NAMES)] for i, name in enumerate(COLOR_NAMES)}

QUESTIONS = (
    "What colour is this picture ?",
    "Which colour fills most of the image ?",
    "Name the main colour of the picture .",
)
ANSWERS = (
    "The picture is mostly {color} .",
    "It is mainly {color} .",
    "Most of the image is {color} .",
)
MALFORMED = -3.0  # below any well-formed answer: degenerate text never wins


def vocabulary() -> list[str]:
    """Every word the task can produce: the built-in vision tokenizer is word-level over exactly these."""
    words = {w for text in (*QUESTIONS, *ANSWERS) for w in text.replace("{", " {").split() if not w.startswith("{")}
    return sorted(words | set(COLOR_NAMES))


def make_image(color: str, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """An RGB picture mostly in `color`, with one or two rectangles of other palette colours at random places."""
    others = [c for c in COLOR_NAMES if c != color]
    while True:
        image = Image.new("RGB", (size, size), COLORS[color])
        draw = ImageDraw.Draw(image)
        for patch in rng.sample(others, rng.randint(1, 2)):
            w, h = rng.randint(size // 5, size * 3 // 5), rng.randint(size // 5, size * 3 // 5)
            x, y = rng.randint(0, size - w), rng.randint(0, size - h)
            draw.rectangle((x, y, x + w - 1, y + h - 1), fill=COLORS[patch])
        share = _pixel_count(image, COLORS[color]) / (size * size)
        if MIN_DOMINANT_FRACTION <= share <= 1 - MIN_OTHER_FRACTION:
            return image


def _pixel_count(image: Image.Image, rgb: tuple[int, int, int]) -> int:
    return sum(n for n, c in image.getcolors(image.width * image.height) if c == rgb)


def nearest_color(rgb: tuple[int, ...]) -> str:
    """The palette colour closest to `rgb` (squared Euclidean distance)."""
    return min(COLOR_NAMES, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLORS[name], rgb[:3])))


def dominant_color(image: Image.Image) -> str:
    """Each pixel votes for its nearest palette colour; the colour with the most votes."""
    rgb = image.convert("RGB")
    votes: dict[str, int] = {}
    for count, pixel in rgb.getcolors(rgb.width * rgb.height):
        name = nearest_color(pixel)
        votes[name] = votes.get(name, 0) + count
    return max(COLOR_NAMES, key=lambda name: votes.get(name, 0))


def prompt_messages(question: str) -> list[dict]:
    """A user turn holding the image followed by the question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def answer_messages(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def preference_pairs(num_pairs: int, seed: int) -> list[dict]:
    """Conversational vision pairs, all distinct (a fresh image each): chosen names the picture's dominant
    colour, rejected another colour in the same answer template. Train and eval use different seeds."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < num_pairs:
        color = rng.choice(COLOR_NAMES)
        image = make_image(color, rng)
        if image.tobytes() in seen:
            continue
        seen.add(image.tobytes())
        template = rng.choice(ANSWERS)
        wrong = rng.choice([c for c in COLOR_NAMES if c != color])
        rows.append(
            {
                "images": [image],
                "prompt": prompt_messages(rng.choice(QUESTIONS)),
                "chosen": answer_messages(template.format(color=color)),
                "rejected": answer_messages(template.format(color=wrong)),
            }
        )
    return rows


def warmup_examples(num_examples: int, positive_fraction: float, seed: int) -> list[dict]:
    """Supervised examples for the base model: the answer names the right colour with probability
    `positive_fraction`, otherwise its fixed confusion colour (`CONFUSION`), so the reference can produce
    both but usually names the wrong one (the room DPO has to improve)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_examples):
        color = rng.choice(COLOR_NAMES)
        image = make_image(color, rng)
        named = color if rng.random() < positive_fraction else CONFUSION[color]
        rows.append(
            {
                "images": [image],
                "prompt": prompt_messages(rng.choice(QUESTIONS)),
                "completion": answer_messages(rng.choice(ANSWERS).format(color=named)),
            }
        )
    return rows


def _answer_pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{color\}", r"(?P<color>\w+)") + "$")


ANSWER_PATTERNS = tuple(_answer_pattern(t) for t in ANSWERS)


def named_color(completion: str) -> str | None:
    """The palette colour a well-formed answer names; None for anything else."""
    text = " ".join(completion.split())
    match = next((m for m in (p.match(text) for p in ANSWER_PATTERNS) if m), None)
    return match["color"] if match is not None and match["color"] in COLORS else None


def judge(image: Image.Image, completion: str) -> float:
    """+1 for a well-formed answer naming the image's dominant colour, −1 for one naming another colour,
    MALFORMED for anything else. `image` may also be a row's one-image list."""
    if isinstance(image, (list, tuple)):
        image = image[0]
    named = named_color(completion)
    if named is None:
        return MALFORMED
    return 1.0 if named == dominant_color(image) else -1.0


def win_rate(images: list, policy_answers: list[str], reference_answers: list[str]) -> tuple[float, list[float]]:
    """Judged win rate of the policy over the reference; a tie counts as half a win."""
    outcomes = []
    for image, mine, theirs in zip(images, policy_answers, reference_answers, strict=True):
        a, b = judge(image, mine), judge(image, theirs)
        outcomes.append(1.0 if a > b else 0.5 if a == b else 0.0)
    return sum(outcomes) / max(1, len(outcomes)), outcomes
