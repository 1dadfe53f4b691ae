"""Value rules: each says what is wrong with a value, in words, or None. Defined once and attached to the
option they guard (a `DPOConfig` field, a params-schema field), so the in-process API and params.yaml
cannot disagree."""

from __future__ import annotations

from typing import Any, Callable

from pipeline.core.errors import PipelineError

Rule = Callable[[Any], "str | None"]


def at_least(low: float) -> Rule:
    def rule(value):
        return None if value is None or value >= low else f"must be >= {low}"

    return rule


def greater_than(low: float) -> Rule:
    def rule(value):
        return None if value is None or value > low else f"must be > {low}"

    return rule


def within(low: float, high: float, *, high_open: bool = False, low_open: bool = False) -> Rule:
    """In the interval [low, high], each end open when asked (written as in the spec: [0, 0.5))."""
    shown = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def rule(value):
        if value is None:
            return None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return None if above and below else f"must be in {shown}"

    return rule


def one_of(*choices: Any) -> Rule:
    def rule(value):
        return None if value is None or value in choices else f"must be one of {list(choices)}"

    return rule


def dtype_name(value: Any) -> str | None:
    """A dtype as from_pretrained takes it by name: a torch dtype (`bfloat16`, `float32`, ...) or `auto`."""
    import torch

    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return None
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return None
    return "is not a dtype; use a torch dtype name such as bfloat16, float16 or float32, or auto"


def check(value: Any, rule: Rule | None, key: str, fix: str = "") -> None:
    """Raise a PipelineError naming `key`, the bad value and the fix when `rule` finds a problem."""
    problem = rule(value) if rule is not None else None
    if problem:
        raise PipelineError(f"{key} {problem} (got {value!r}){'; ' + fix if fix else ''}.")
