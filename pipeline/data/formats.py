"""Preference-row formats: detection, implicit-prompt extraction and validation of one raw row.

A raw row is standard (strings) or conversational (lists of `{"role", "content", ...}` messages),
with an explicit `prompt` or an implicit one shared by `chosen` and `rejected`. `canonical_pair`
turns any of them into the canonical explicit-prompt form or raises `InvalidRow` naming the rule.
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant", "tool", "developer")


class InvalidRow(ValueError):
    """A row that breaks a validation rule; `rule` is a short stable name used in reports."""

    def __init__(self, rule: str, detail: str):
        super().__init__(f"{rule}: {detail}")
        self.rule = rule
        self.detail = detail


def is_conversational(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value) and len(value) > 0


def _check_messages(field: str, messages: list) -> None:
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRow("unknown_role", f"{field}[{i}] has role {role!r}; expected one of {list(ROLES)}")
        content = message.get("content")
        if content is None and message.get("tool_calls"):
            continue  # an assistant turn that only calls tools
        if not isinstance(content, str):
            raise InvalidRow("non_string_content", f"{field}[{i}].content is {type(content).__name__}, expected text")


def _word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def extract_text_prompt(chosen: str, rejected: str, marker: str | None = None) -> tuple[str, str, str]:
    """Split two full texts into (prompt, chosen completion, rejected completion).

    Without a marker the prompt is the longest common prefix, moved back so that it never ends inside
    a word; trailing whitespace goes to the completions (" blue." tokenizes like the model saw it).
    With a marker (e.g. "\\n\\nAssistant:") the prompt ends right after its last occurrence inside the
    common prefix, so words both answers happen to start with stay in the completions.
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    if marker is not None:
        cut = chosen.rfind(marker, 0, n)
        if cut < 0:
            raise InvalidRow("no_prompt", f"the turn marker {marker!r} does not occur in the text both completions share")
        n = cut + len(marker)
    else:
        while n > 0 and _word_char(chosen[n - 1]) and (
                (n < len(chosen) and _word_char(chosen[n])) or (n < len(rejected) and _word_char(rejected[n]))):
            n -= 1
    prompt = chosen[:n].rstrip()
    if not prompt.strip():
        raise InvalidRow("no_prompt", "chosen and rejected share no prompt text, so the prompt cannot be extracted; "
                                      "add an explicit 'prompt' column")
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def extract_message_prompt(chosen: list, rejected: list) -> tuple[list, list, list]:
    """Split two conversations at their last shared message: the rest must be assistant turns."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise InvalidRow("no_prompt", "chosen and rejected share no leading message, so the prompt cannot be extracted")
    return chosen[:n], chosen[n:], rejected[n:]


def canonical_pair(raw: dict, prompt_marker: str | None = None) -> dict:
    """Validate one raw row and return it in explicit-prompt form (still Python objects)."""
    for column in ("chosen", "rejected"):
        if column not in raw:
            raise InvalidRow("missing_column", f"no {column!r} column (columns: {sorted(raw)})")
        if raw[column] is None:
            raise InvalidRow("null_field", f"{column!r} is null")
    prompt, chosen, rejected = raw.get("prompt"), raw["chosen"], raw["rejected"]
    conversational = is_conversational(chosen)
    if conversational != is_conversational(rejected) or (prompt is not None and conversational != is_conversational(prompt)):
        raise InvalidRow("mixed_format", "prompt/chosen/rejected mix plain text and message lists")
    if not conversational and not all(isinstance(v, str) for v in (chosen, rejected) + ((prompt,) if prompt is not None else ())):
        raise InvalidRow("bad_type", "fields must be strings (standard format) or lists of messages (conversational)")
    if conversational:
        for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if value is not None:
                _check_messages(name, value)
        if prompt is None:
            prompt, chosen, rejected = extract_message_prompt(chosen, rejected)
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if not value:
                raise InvalidRow("empty_completion", f"{name} has no message after the prompt")
            if value[0]["role"] != "assistant":
                raise InvalidRow("completion_not_assistant", f"{name} starts with a {value[0]['role']!r} turn, not an assistant turn")
    else:
        if prompt is None:
            if chosen == rejected:
                raise InvalidRow("identical_pair", "chosen and rejected are identical")
            prompt, chosen, rejected = extract_text_prompt(chosen, rejected, prompt_marker)
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if not value.strip():
                raise InvalidRow("empty_completion", f"{name} is empty")
    if chosen == rejected:
        raise InvalidRow("identical_pair", "chosen and rejected are identical")
    tools = raw.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as err:
            raise InvalidRow("bad_tools_json", f"'tools' is not valid JSON ({err.msg} at char {err.pos})") from None
    return {"conversational": conversational, "prompt": prompt, "chosen": chosen, "rejected": rejected,
            "tools": tools or None, "chat_template_kwargs": raw.get("chat_template_kwargs") or None}
