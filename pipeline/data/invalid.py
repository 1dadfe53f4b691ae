"""The rules a preference row can break, and the error that names one.

`RULES` lists every rule with what it means (the normalize and tokenize stages, and the in-process API, refuse
or drop a row by these names; docs/data.md's rule table is checked against it). `InvalidRow` carries the rule and
the row's detail.
"""

from __future__ import annotations

ROLES = ("system", "developer", "user", "assistant", "tool")

RULES = {
    # normalize: reading the source
    "malformed_row": "the source cannot be read or parsed at this row (invalid JSON line, a non-UTF-8 byte, a lone "
    "surrogate escape, JSON nested too deep, NaN/Infinity, an object with the same key twice, a CSV "
    "row with more or fewer fields than the header, a row that is not an object)",
    "preprocess_failed": "the data.preprocess hook raised on this row, or returned something other than a mapping "
    "or None",
    "preprocess_skipped": "the data.preprocess hook returned None for this row (always dropped, under either policy)",
    # normalize: one row
    "missing_column": "the row has no chosen/rejected column (or no column data.columns maps to)",
    "null_field": "chosen or rejected is null (a key absent from one JSON row while others have it reads as null)",
    "bad_type": "a field is neither a string (standard format) nor a list of messages (conversational)",
    "mixed_format": "prompt/chosen/rejected mix strings and message lists, or the row's format differs from the "
    "first row of its dataset",
    "bad_message": "a message is not an object with a 'role'",
    "unknown_role": f"a message's role is not one of {list(ROLES)}",
    "non_string_content": "a message's content is neither a string nor a list of content parts ({'type': 'text', "
    "'text': ...} or {'type': 'image'}) (only an assistant turn with tool_calls may omit it)",
    "bad_tool_call": "an assistant message's tool_calls is not a list of {'function': {'name': ...}} objects",
    "no_prompt": "the prompt is empty, or chosen and rejected share no prompt to extract",
    "empty_completion": "a completion is empty: no text after the prompt (e.g. an empty last assistant turn of an "
    "implicit-prompt text), no message after the prompt, or only empty messages",
    "completion_not_assistant": "a conversational completion does not start with an assistant turn, or holds "
    "user/system turns",
    "identical_pair": "chosen and rejected are identical: no preference",
    "bad_tools_json": "tools is not a JSON list of tool schemas (objects), or is a string that is not valid JSON",
    "bad_chat_template_kwargs": "chat_template_kwargs is not a mapping (or a JSON object string), or overrides an "
    "argument the pipeline sets itself",
    "template_fields_on_text": "tools or chat_template_kwargs on a standard (text) row: only the chat template "
    "uses them, and text rows are not templated",
    "bad_image": "an image of the row does not decode, its file cannot be read, or the row gives both 'image' and "
    "'images'",
    "image_count_mismatch": "the number of {'type': 'image'} parts in the prompt differs from the number of images, "
    "or a completion holds an image part (images belong to the prompt)",
    "image_outside_source": "an image path resolves (symlinks followed) outside the data file's directory and "
    "data.image_root: only files there are read",
    "images_on_text": "images on a standard (text) row: image placeholders need the conversational format, "
    "with {'type': 'image'} content parts",
    "duplicate_pair": "the same prompt, chosen, rejected, tools (and images) as an earlier row (the first one is kept)",
    # tokenize
    "template_error": "the tokenizer's chat template fails on the row (e.g. roles that do not alternate)",
    "template_changes_prompt": "the chat template renders the prompt differently once a completion follows, so "
    "the completion cannot be located in the rendered text",
    "emptied_by_truncation": "max_length leaves no completion tokens (always dropped, under either policy)",
    "image_truncated": "max_length would cut some of the row's image tokens (set tokenize.max_length: null, or "
    "DPOConfig(max_length=None), as the reference documentation advises for vision models)",
}


class InvalidRow(ValueError):
    """A row that breaks a validation rule; `rule` is a key of `RULES`, used in reports."""

    def __init__(self, rule: str, detail: str):
        assert rule in RULES, rule
        super().__init__(f"{rule}: {detail}")
        self.rule = rule
        self.detail = detail

    def __reduce__(self):  # picklable, for tokenizer worker processes
        return InvalidRow, (self.rule, self.detail)
