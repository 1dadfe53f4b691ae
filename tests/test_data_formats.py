"""Preference formats of the reference documentation, one row at a time: detection, implicit-prompt
extraction, tool calling, and each validation rule of `canonical_pair`."""

from __future__ import annotations

import json

import pytest

from pipeline.data.formats import canonical_pair, drop_nulls, extract_text_prompt
from pipeline.data.invalid import RULES, InvalidRow
from pipeline.data.schema import row_id_for

USER = {"role": "user", "content": "What color is the sky?"}
BLUE = {"role": "assistant", "content": "It is blue."}
GREEN = {"role": "assistant", "content": "It is green."}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = {
    "role": "assistant",
    "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
}
RESULT = {"role": "tool", "name": "get_weather", "content": '{"temperature": 21}'}


def test_standard_explicit_and_implicit_prompt_give_the_same_pair():
    explicit = canonical_pair({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."})
    implicit = canonical_pair({"chosen": "The sky is blue.", "rejected": "The sky is green."})
    for pair in (explicit, implicit):
        assert not pair["conversational"]
        assert (pair["prompt"], pair["chosen"], pair["rejected"]) == ("The sky is", " blue.", " green.")
    assert not explicit["implicit_prompt"] and implicit["implicit_prompt"]
    ids = [row_id_for(p["prompt"], p["chosen"], p["rejected"]) for p in (explicit, implicit)]
    assert ids[0] == ids[1]  # the same pair, whichever way it was written


def test_conversational_explicit_and_implicit_prompt_give_the_same_pair():
    explicit = canonical_pair({"prompt": [USER], "chosen": [BLUE], "rejected": [GREEN]})
    implicit = canonical_pair({"chosen": [USER, BLUE], "rejected": [USER, GREEN]})
    for pair in (explicit, implicit):
        assert pair["conversational"]
        assert (pair["prompt"], pair["chosen"], pair["rejected"]) == ([USER], [BLUE], [GREEN])


def test_system_message_and_multi_turn_prompt_are_kept_in_order():
    system = {"role": "system", "content": "Be brief."}
    history = [system, USER, {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "And at night?"}]
    night, day = {"role": "assistant", "content": "Black."}, {"role": "assistant", "content": "Blue."}
    pair = canonical_pair({"chosen": history + [night], "rejected": history + [day]})
    assert pair["prompt"] == history and pair["chosen"] == [night] and pair["rejected"] == [day]


def test_tool_calling_row_with_tools_as_a_list_or_a_json_string():
    row = {
        "prompt": [USER, CALL, RESULT],
        "chosen": [{"role": "assistant", "content": "21 degrees in Paris."}],
        "rejected": [{"role": "assistant", "content": "I cannot know."}],
    }
    as_list = canonical_pair({**row, "tools": [WEATHER_TOOL]})
    as_text = canonical_pair({**row, "tools": json.dumps([WEATHER_TOOL])})
    assert as_list["tools"] == as_text["tools"] == [WEATHER_TOOL]
    assert as_list["prompt"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    # a completion may itself call a tool, and carry the tool's answer and the final turn
    completion = canonical_pair(
        {
            "prompt": [USER],
            "chosen": [CALL, RESULT, {"role": "assistant", "content": "21."}],
            "rejected": [GREEN],
            "tools": [WEATHER_TOOL],
        }
    )
    assert [m["role"] for m in completion["chosen"]] == ["assistant", "tool", "assistant"]


def test_chat_template_kwargs_as_mapping_or_json_string():
    row = {"prompt": [USER], "chosen": [BLUE], "rejected": [GREEN]}
    assert canonical_pair({**row, "chat_template_kwargs": {"enable_thinking": False}})["chat_template_kwargs"] == {
        "enable_thinking": False
    }
    assert canonical_pair({**row, "chat_template_kwargs": '{"enable_thinking": true}'})["chat_template_kwargs"] == {
        "enable_thinking": True
    }
    assert canonical_pair({**row, "chat_template_kwargs": None})["chat_template_kwargs"] is None


def test_arrow_nulls_are_dropped_from_messages_but_list_items_are_kept():
    # what a Parquet/datasets round trip makes of [BLUE] next to a row that has tool calls
    unified = [{"role": "assistant", "content": "It is blue.", "tool_calls": None, "name": None}]
    assert drop_nulls(unified) == [BLUE]
    assert drop_nulls({"enum": ["a", None]}) == {"enum": ["a", None]}
    pair = canonical_pair({"prompt": [dict(USER, tool_calls=None)], "chosen": unified, "rejected": [GREEN]})
    assert pair["prompt"] == [USER] and pair["chosen"] == [BLUE]


@pytest.mark.parametrize(
    "chosen, rejected, prompt",
    [
        ("The sky is blue.", "The sky is green.", "The sky is"),
        ("Answer: 3.14 exactly", "Answer: 3.15 roughly", "Answer:"),  # never inside a number
        ("She said: I’m sure", "She said: I’ll see", "She said:"),  # nor inside a contraction
        ("Go to https://a.org/x now", "Go to https://a.org/y now", "Go to"),  # nor inside a URL
        ("Question\nAnswer yes", "Question\nAnswer no", "Question\nAnswer"),
    ],
)
def test_implicit_text_prompt_never_ends_inside_a_word(chosen, rejected, prompt):
    got, chosen_rest, rejected_rest = extract_text_prompt(chosen, rejected)
    assert got == prompt
    assert got + chosen_rest == chosen and got + rejected_rest == rejected
    assert chosen_rest[0].isspace() and rejected_rest[0].isspace()


def test_prompt_marker_keeps_shared_leading_words_in_the_completions():
    chosen = "\n\nHuman: Is it safe?\n\nAssistant: I think so, yes."
    rejected = "\n\nHuman: Is it safe?\n\nAssistant: I think not."
    no_marker = extract_text_prompt(chosen, rejected)
    assert no_marker[0].endswith("\n\nAssistant: I think")  # whole words, but the answers' shared start
    prompt, c, r = extract_text_prompt(chosen, rejected, "\n\nAssistant:")
    assert prompt == "\n\nHuman: Is it safe?\n\nAssistant:" and c == " I think so, yes." and r == " I think not."
    # the marker is only looked for in the shared text
    with pytest.raises(InvalidRow) as err:
        extract_text_prompt("Q: a\n\nAssistant: x", "Q: b\n\nAssistant: x", "\n\nAssistant:")
    assert err.value.rule == "no_prompt"


# one raw row per rule that canonical_pair enforces (the rules of sources, normalize and tokenize
# are tested where they live)
BAD_ROWS = {
    "missing_column": {"prompt": "Q", "chosen": "a"},
    "null_field": {"prompt": "Q", "chosen": None, "rejected": "b"},
    "bad_type": {"prompt": "Q", "chosen": 3, "rejected": "b"},
    "mixed_format": {"prompt": "Q", "chosen": [BLUE], "rejected": [GREEN]},
    "bad_message": {"prompt": [USER], "chosen": [BLUE, "text"], "rejected": [GREEN]},
    "unknown_role": {"prompt": [{"role": "human", "content": "hi"}], "chosen": [BLUE], "rejected": [GREEN]},
    "non_string_content": {
        "prompt": [USER],
        "chosen": [{"role": "assistant", "content": ["It", "is"]}],
        "rejected": [GREEN],
    },
    "bad_tool_call": {
        "prompt": [USER],
        "chosen": [{"role": "assistant", "tool_calls": [{"function": {}}]}],
        "rejected": [GREEN],
    },
    "no_prompt": {"chosen": "Alpha one", "rejected": "Beta two"},
    "empty_completion": {"prompt": [USER], "chosen": [{"role": "assistant", "content": "  "}], "rejected": [GREEN]},
    "completion_not_assistant": {"chosen": [USER, BLUE], "rejected": [USER, GREEN, USER]},
    "identical_pair": {"prompt": "Q", "chosen": " same", "rejected": " same"},
    "bad_tools_json": {"prompt": [USER], "chosen": [BLUE], "rejected": [GREEN], "tools": '[{"type": '},
    "bad_chat_template_kwargs": {
        "prompt": [USER],
        "chosen": [BLUE],
        "rejected": [GREEN],
        "chat_template_kwargs": {"add_generation_prompt": False},
    },
    "template_fields_on_text": {"prompt": "Q", "chosen": " a", "rejected": " b", "tools": [WEATHER_TOOL]},
}


@pytest.mark.parametrize("rule", sorted(BAD_ROWS))
def test_each_row_rule(rule):
    with pytest.raises(InvalidRow) as err:
        canonical_pair(BAD_ROWS[rule])
    assert err.value.rule == rule and rule in RULES and err.value.detail


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "Q", "chosen": "", "rejected": " b"},
        {"prompt": [USER], "chosen": [], "rejected": [GREEN]},
        {"chosen": [USER, BLUE], "rejected": [USER]},
    ],
)
def test_empty_completions_in_each_format(row):
    with pytest.raises(InvalidRow) as err:
        canonical_pair(row)
    assert err.value.rule == "empty_completion"


@pytest.mark.parametrize(
    "row, rule",
    [
        ({"prompt": [USER], "chosen": [USER, BLUE], "rejected": [GREEN]}, "completion_not_assistant"),
        ({"prompt": [USER], "chosen": [BLUE], "rejected": [GREEN], "tools": {"not": "a list"}}, "bad_tools_json"),
        ({"prompt": [USER], "chosen": [BLUE], "rejected": [GREEN], "tools": "[1, 2]"}, "bad_tools_json"),
        (
            {"prompt": [USER], "chosen": [BLUE], "rejected": [GREEN], "chat_template_kwargs": "[1]"},
            "bad_chat_template_kwargs",
        ),
        ({"prompt": [{"role": "user", "content": None}], "chosen": [BLUE], "rejected": [GREEN]}, "non_string_content"),
        (
            {"prompt": [dict(USER, tool_calls=CALL["tool_calls"])], "chosen": [BLUE], "rejected": [GREEN]},
            "bad_tool_call",
        ),
        ({"prompt": [], "chosen": [BLUE], "rejected": [GREEN]}, "no_prompt"),
        ({"prompt": "  ", "chosen": " a", "rejected": " b"}, "no_prompt"),
        ({"chosen": [USER, BLUE], "rejected": [USER, BLUE]}, "identical_pair"),
    ],
)
def test_more_shapes_of_the_rules(row, rule):
    with pytest.raises(InvalidRow) as err:
        canonical_pair(row)
    assert err.value.rule == rule
