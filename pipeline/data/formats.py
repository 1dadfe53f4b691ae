"""Preference-row formats: detection, implicit-prompt extraction and validation of one raw row.

A raw row is *standard* (`prompt`/`chosen`/`rejected` are strings) or *conversational* (lists of
`{"role", "content", ...}` messages, with `tool_calls` and `tool` turns for tool calling), with an
explicit `prompt` or an implicit one that `chosen` and `rejected` share. `canonical_pair` turns any
of them into the canonical explicit-prompt form, or raises `InvalidRow` naming the broken rule
(`pipeline.data.invalid.RULES` lists every rule, with what it means).

Implicit prompts:
- conversational: the prompt is the leading messages both conversations share; the rest of each
  must be assistant turns (tool turns may follow an assistant turn that calls tools).
- standard: the prompt is the longest common prefix cut back to a whitespace boundary, so it never
  ends inside a word (or a number, or a URL); the whitespace goes to the completions (" blue.").
  With `prompt_marker` (e.g. "\\n\\nAssistant:") the prompt instead ends right after the last
  occurrence of the marker inside the common prefix, i.e. at the last turn both texts share, so
  leading words the two answers happen to share stay in the completions.

Null values inside messages, `tools` and `chat_template_kwargs` are dropped: Arrow sources
(Parquet, `datasets`) fill every key that any row has with null, so null and absent cannot be told
apart; absent is what the data meant (a chat template testing `message.tool_calls is defined` must
not see a tool call in every message).
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.data.images import IMAGE_COLUMNS, placeholders, row_images
from pipeline.data.invalid import ROLES, InvalidRow

COMPLETION_ROLES = ("assistant", "tool")  # a completion is assistant turns, with tool results between them
# arguments of apply_chat_template that a row's chat_template_kwargs may not override
RESERVED_TEMPLATE_KWARGS = (
    "conversation",
    "tools",
    "documents",
    "chat_template",
    "add_generation_prompt",
    "continue_final_message",
    "tokenize",
    "padding",
    "truncation",
    "max_length",
    "return_tensors",
    "return_dict",
    "return_assistant_tokens_mask",
    "tokenizer_kwargs",
)


def drop_nulls(value: Any) -> Any:
    """`value` with every null-valued mapping key removed, recursively (list items are kept)."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def _kind(name: str, value: Any) -> str:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "messages"
    raise InvalidRow(
        "bad_type",
        f"{name} is {type(value).__name__}; expected a string (standard format) or a list of messages (conversational)",
    )


def _check_tool_calls(where: str, calls: Any) -> None:
    if not isinstance(calls, list) or not calls:
        raise InvalidRow("bad_tool_call", f"{where}.tool_calls is {type(calls).__name__}, expected a non-empty list")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidRow(
                "bad_tool_call",
                f"{where}.tool_calls[{j}] has no function name "
                "(expected {'type': 'function', 'function': {'name': ..., 'arguments': ...}})",
            )
        if not isinstance(function.get("arguments", {}), (dict, str)):
            raise InvalidRow(
                "bad_tool_call",
                f"{where}.tool_calls[{j}].function.arguments is "
                f"{type(function['arguments']).__name__}, expected an object or a JSON string",
            )


def _check_messages(field: str, messages: list) -> None:
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict) or "role" not in message:
            raise InvalidRow("bad_message", f"{where} is not a message object with a 'role'")
        role = message["role"]
        if role not in ROLES:
            raise InvalidRow("unknown_role", f"{where} has role {role!r}; expected one of {list(ROLES)}")
        if "tool_calls" in message:
            if role != "assistant":
                raise InvalidRow(
                    "bad_tool_call", f"{where} is a {role!r} turn with tool_calls; only assistant turns call tools"
                )
            _check_tool_calls(where, message["tool_calls"])
        content = message.get("content")
        if content is None and "tool_calls" in message:
            continue  # an assistant turn that only calls tools
        if isinstance(content, list):
            _check_parts(where, content)
        elif not isinstance(content, str):
            raise InvalidRow(
                "non_string_content",
                f"{where}.content is {type(content).__name__}, expected text or a list of content parts",
            )


def _check_parts(where: str, parts: list) -> None:
    """A multimodal content: a list of {'type': 'text', 'text': str} and {'type': 'image'} parts."""
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image" or (kind == "text" and isinstance(part.get("text"), str)):
            continue
        raise InvalidRow(
            "non_string_content",
            f"{where}.content[{j}] is not a content part {{'type': 'text', 'text': "
            f"...}} or {{'type': 'image'}} (got {json.dumps(part, default=repr)[:80]})",
        )


def _content_text(content) -> str:
    """The text of a message's content: the string, or its text parts joined."""
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content if part.get("type") == "text")
    return content or ""


def _has_text(messages: list) -> bool:
    return any(_content_text(m.get("content")).strip() or m.get("tool_calls") for m in messages)


def extract_text_prompt(chosen: str, rejected: str, marker: str | None = None) -> tuple[str, str, str]:
    """Split two full texts into (prompt, chosen completion, rejected completion); see the module docstring."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    if marker:
        cut = chosen.rfind(marker, 0, n)
        if cut < 0:
            raise InvalidRow(
                "no_prompt",
                f"the turn marker {marker!r} does not occur in the text chosen and rejected "
                "share, so the prompt cannot be extracted",
            )
        n = cut + len(marker)
    else:
        # a cut is clean where the prompt ends in whitespace or both continuations start with it
        def clean(i: int) -> bool:
            return chosen[i - 1].isspace() or all(i == len(t) or t[i].isspace() for t in (chosen, rejected))

        while n > 0 and not clean(n):
            n -= 1
    prompt = chosen[:n].rstrip()
    if not prompt.strip():
        hint = "" if marker else " (or set data.prompt_marker, e.g. '\\n\\nAssistant:')"
        raise InvalidRow(
            "no_prompt",
            "chosen and rejected share no prompt text, so the prompt cannot be extracted; "
            f"add an explicit 'prompt' column{hint}",
        )
    return prompt, chosen[len(prompt) :], rejected[len(prompt) :]


def extract_message_prompt(chosen: list, rejected: list) -> tuple[list, list, list]:
    """Split two conversations after their last shared leading message."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise InvalidRow("no_prompt", "chosen and rejected share no leading message, so the prompt cannot be extracted")
    return chosen[:n], chosen[n:], rejected[n:]


def _from_json(value: Any, column: str, rule: str) -> Any:
    """A column given as a JSON string, decoded (a blank string is None); any other value as it is."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise InvalidRow(rule, f"'{column}' is not valid JSON ({err.msg} at char {err.pos})") from None


def parse_tools(tools: Any) -> list | None:
    """The `tools` column as a list of tool schemas, from a list or a JSON string; None when empty."""
    tools = _from_json(tools, "tools", "bad_tools_json")
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and t for t in tools):
        raise InvalidRow(
            "bad_tools_json", f"'tools' must be a list of JSON schemas (objects), got {json.dumps(tools)[:80]}"
        )
    return drop_nulls(tools)


def parse_template_kwargs(kwargs: Any) -> dict | None:
    kwargs = _from_json(kwargs, "chat_template_kwargs", "bad_chat_template_kwargs")
    if kwargs is None:
        return None
    if not isinstance(kwargs, dict):
        raise InvalidRow(
            "bad_chat_template_kwargs", f"'chat_template_kwargs' is {type(kwargs).__name__}, expected a mapping"
        )
    reserved = sorted(set(kwargs) & set(RESERVED_TEMPLATE_KWARGS))
    if reserved:
        raise InvalidRow(
            "bad_chat_template_kwargs",
            f"'chat_template_kwargs' sets {reserved[0]!r}, which the pipeline "
            "sets itself (tools come from the 'tools' column)",
        )
    return drop_nulls(kwargs) or None


def empty_text_completion(name: str, implicit: bool) -> str:
    """What is empty when a text completion is blank: with an implicit prompt the full text is not, only what
    follows the shared prompt (typically a last assistant turn with no answer)."""
    if implicit:
        return (
            f"{name} is empty after the prompt: the completion (the text after the prompt that chosen and "
            f"rejected share, i.e. the last assistant turn) has no text"
        )
    return f"{name} is empty: the completion has no text"


def invalid_row_message(where: str | None, rows: int | list[int], rule: str, detail: str) -> str:
    """Invalid rows, as every path (stages and API) names them: where (the file or dataset; None in a list that
    already named it), the row or rows with this problem, what is wrong, the rule."""
    rows = rows if isinstance(rows, list) else [rows]
    numbered = f"row {rows[0]}" if len(rows) == 1 else f"rows {', '.join(map(str, rows))}"
    return f"{where + ': ' if where else ''}{numbered}: {detail} [rule {rule}]"


def canonical_pair(raw: dict, prompt_marker: str | None = None, image_files=None) -> dict:
    """Validate one raw row and return it in explicit-prompt form (still Python objects).

    Returns {"conversational", "prompt", "chosen", "rejected", "tools", "chat_template_kwargs", "images",
    "implicit_prompt"}; `images` is None, or the row's images stored as `pipeline.data.images` says (relative
    paths read through `image_files`, an `images.ImageFiles`; None: anywhere, from the working directory).
    """
    for column in ("chosen", "rejected"):
        if column not in raw:
            raise InvalidRow("missing_column", f"no {column!r} column (columns: {sorted(map(str, raw))})")
        if raw[column] is None:
            raise InvalidRow("null_field", f"{column!r} is null")
    prompt, chosen, rejected = raw.get("prompt"), raw["chosen"], raw["rejected"]
    kinds = {
        _kind(name, value)
        for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected))
        if value is not None
    }
    if len(kinds) > 1:
        raise InvalidRow("mixed_format", "prompt/chosen/rejected mix plain text and message lists")
    conversational = kinds == {"messages"}
    tools = parse_tools(raw.get("tools"))
    template_kwargs = parse_template_kwargs(raw.get("chat_template_kwargs"))
    implicit = prompt is None
    if conversational:
        prompt, chosen, rejected = (drop_nulls(v) if v is not None else None for v in (prompt, chosen, rejected))
        for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if value is not None:
                _check_messages(name, value)
        if implicit:
            if chosen == rejected:
                raise InvalidRow("identical_pair", "chosen and rejected are identical")
            prompt, chosen, rejected = extract_message_prompt(chosen, rejected)
        elif not prompt:
            raise InvalidRow("no_prompt", "prompt is an empty list of messages")
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if not value:
                raise InvalidRow("empty_completion", f"{name} has no message after the prompt")
            if value[0]["role"] != "assistant" or any(m["role"] not in COMPLETION_ROLES for m in value):
                roles = [m["role"] for m in value]
                raise InvalidRow(
                    "completion_not_assistant",
                    f"{name} completion has turns {roles}; it must start with "
                    "an assistant turn and hold only assistant (and tool) turns",
                )
            if not _has_text(value):
                raise InvalidRow("empty_completion", f"{name} completion has no text and no tool call")
    else:
        if tools is not None or template_kwargs is not None:
            raise InvalidRow(
                "template_fields_on_text",
                "tools/chat_template_kwargs need the conversational format (only chat templates render them)",
            )
        if implicit:
            if chosen == rejected:
                raise InvalidRow("identical_pair", "chosen and rejected are identical")
            prompt, chosen, rejected = extract_text_prompt(chosen, rejected, prompt_marker)
        elif not prompt.strip():
            raise InvalidRow("no_prompt", "prompt is empty")
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if not value.strip():
                raise InvalidRow("empty_completion", empty_text_completion(name, implicit))
    if chosen == rejected:
        raise InvalidRow("identical_pair", "chosen and rejected are identical")
    images = _checked_images(raw, conversational, prompt, chosen, rejected, image_files)
    return {
        "conversational": conversational,
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "tools": tools,
        "chat_template_kwargs": template_kwargs,
        "images": images,
        "implicit_prompt": implicit,
    }


def _checked_images(raw: dict, conversational: bool, prompt, chosen, rejected, image_files) -> list[dict] | None:
    """The row's stored images, checked against its `{"type": "image"}` parts: as many as the prompt has, none in
    the completions, none on a standard (text) row."""
    if all(
        raw.get(column) is None or (isinstance(raw.get(column), list) and not raw[column]) for column in IMAGE_COLUMNS
    ):
        images = None
    elif not conversational:
        raise InvalidRow(
            "images_on_text",
            "the row has images but is in the standard (text) format; write it as "
            "conversational messages with {'type': 'image'} content parts",
        )
    else:
        images = row_images(raw, image_files)
    if not conversational:
        return None
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if placeholders(messages):
            raise InvalidRow(
                "image_count_mismatch", f"the {name} completion holds an image part; images belong to the prompt"
            )
    wanted, given = placeholders(prompt), len(images or [])
    if wanted != given:
        raise InvalidRow(
            "image_count_mismatch",
            f"the prompt has {wanted} image part{'s' * (wanted != 1)} "
            f"({{'type': 'image'}}) but the row gives {given} image"
            f"{'s' * (given != 1)}; give one image per image part, in order",
        )
    return images
