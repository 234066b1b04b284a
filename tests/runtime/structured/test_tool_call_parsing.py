"""Tool calls parsed from model text (no model): the Hermes/Qwen `<tool_call>` form and the Llama 3 JSON
form, whole and streamed in arbitrary pieces (the deltas add up to the whole parse), checked `tools` and
`tool_choice` with errors naming the field."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.server import tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def _calls(calls: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def _stream(text: str, plan: tools.ToolPlan, rng: random.Random) -> tuple[str, list[tuple[str, Any]]]:
    """Feed `text` in random pieces and reassemble the deltas as OpenAI's client does."""
    parser = tools.StreamParser(plan)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 6))) if len(text) > 1 else []
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    content = ""
    calls: dict[int, dict[str, str]] = {}
    for i, piece in enumerate(pieces):
        delta = parser.feed(piece, final=i == len(pieces) - 1)
        content += delta.content
        for d in delta.tool_calls:
            entry = calls.setdefault(d["index"], {"name": "", "arguments": ""})
            entry["name"] += d.get("function", {}).get("name", "") or ""
            entry["arguments"] += d.get("function", {}).get("arguments", "") or ""
            if "id" in d:
                assert d["id"].startswith("call_") and d["type"] == "function"
    return content, [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]


CASES = [
    (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        "Let me check.",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
        None,
        [("get_weather", {"city": "Oslo"}), ("get_time", {})],
    ),
    ('{"name": "get_weather", "parameters": {"city": "Rome"}}', None, [("get_weather", {"city": "Rome"})]),
    (
        '<|python_tag|>{"name": "get_time", "parameters": {}}; {"name": "get_weather", "parameters": {"city": "X"}}',
        None,
        [("get_time", {}), ("get_weather", {"city": "X"})],
    ),
    ("Just text, no calls < here.", "Just text, no calls < here.", []),
    ('{"name": "unknown_tool", "parameters": {}}', '{"name": "unknown_tool", "parameters": {}}', []),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Nice"}', None, []),  # unclosed: text
]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_auto_parses_whole_and_streamed(text: str, content: str | None, calls: list[tuple[str, Any]]) -> None:
    plan = tools.plan([WEATHER, TIME], "auto")
    assert plan is not None
    got_content, got_calls = tools.parse(text, plan)
    assert _calls(got_calls) == calls
    if content is None and not calls:
        content = text
    assert got_content == content
    for seed in range(20):
        streamed_content, streamed_calls = _stream(text, plan, random.Random(seed))
        assert streamed_calls == calls
        assert streamed_content.strip() == (content or "").strip()


def test_required_and_named_parse_the_constrained_output() -> None:
    required = tools.plan([WEATHER, TIME], "required")
    assert required is not None and required.constraint is not None and required.mode == "required"
    text = '[{"name": "get_weather", "parameters": {"city": "Lima"}}, {"name": "get_time", "parameters": {}}]'
    assert _calls(tools.parse(text, required)[1]) == [("get_weather", {"city": "Lima"}), ("get_time", {})]
    assert _stream(text, required, random.Random(1))[1] == [("get_weather", {"city": "Lima"}), ("get_time", {})]
    single = tools.plan([WEATHER, TIME], "required", parallel_tool_calls=False)
    assert single is not None and single.constraint is not None
    assert json.loads(single.constraint.schema)["maxItems"] == 1
    named = tools.plan([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}})
    assert named is not None and named.named == "get_weather" and named.constraint is not None
    assert _calls(tools.parse('{"city": "Kyiv"}', named)[1]) == [("get_weather", {"city": "Kyiv"})]
    assert _stream('{"city": "Kyiv"}', named, random.Random(2))[1] == [("get_weather", {"city": "Kyiv"})]
    none = tools.plan([WEATHER], "none")
    assert none is not None and none.render_tools is None and tools.parse("<tool_call>x", none) == ("<tool_call>x", [])


@pytest.mark.parametrize(
    ("tools_value", "choice", "param"),
    [
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        ([WEATHER], "sometimes", "tool_choice"),
        (None, "required", "tool_choice"),
        ([{"type": "function", "function": {"name": "bad name!"}}], None, "tools[0].function.name"),
        ([{"type": "retrieval"}], None, "tools[0]"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}], None,
         "tools[0].function.parameters"),
        ([WEATHER, WEATHER], None, "tools"),
    ],
)  # fmt: skip
def test_bad_tools_name_the_field(tools_value: Any, choice: Any, param: str) -> None:
    with pytest.raises(request_mod.InvalidParameterError) as caught:
        tools.plan(tools_value, choice)
    assert caught.value.param == param


REQUIRED_TEXTS = [
    # What the grammar produces (compact), with brackets and escaped quotes inside a string argument.
    '[{"name":"get_weather","parameters":{"city":"a}b\\"c]"}},{"name":"get_time","parameters":{}}]',
    # Blanks anywhere between tokens.
    '[ {"name" : "get_weather" , "parameters" : {"city": "Lima"} } ,\n {"name": "get_time", "parameters": {}} ]',
    # Keys the other way round (not what the grammar makes): that element is sent whole when it closes.
    '[{"parameters":{"city":"Oslo"},"name":"get_weather"},{"name":"get_time","parameters":{}}]',
]


def _char_by_char(text: str, plan: tools.ToolPlan) -> tuple[int, list[str]]:
    """Feed one character at a time: (the position whose delta announced the first call, its argument pieces)."""
    parser = tools.StreamParser(plan)
    deltas = [parser.feed(char, final=i == len(text) - 1) for i, char in enumerate(text)]
    head_at = next(i for i, d in enumerate(deltas) if any(c["index"] == 0 and "id" in c for c in d.tool_calls))
    pieces = [c["function"]["arguments"] for d in deltas for c in d.tool_calls if c["index"] == 0 and "id" not in c]
    assert parser.num_calls == 2
    return head_at, pieces


@pytest.mark.parametrize("text", REQUIRED_TEXTS)
def test_required_calls_stream_as_they_are_decoded(text: str) -> None:
    plan = tools.plan([WEATHER, TIME], "required")
    assert plan is not None
    whole = _calls(tools.parse(text, plan)[1])
    assert [name for name, _ in whole] == ["get_weather", "get_time"]
    for seed in range(20):
        assert _stream(text, plan, random.Random(seed)) == ("", whole)
    head_at, pieces = _char_by_char(text, plan)
    first_element_end = text.index("}", text.index("}") + 1)  # the first element's closing brace
    if text.index('"name"') < text.index('"parameters"'):
        # The name is sent once complete, before the arguments are; the arguments come as they are decoded.
        assert head_at < text.index('"parameters"') + len('"parameters"') + 3 < first_element_end
        assert len(pieces) >= len('{"city":"Lima"}') - 1
    else:
        assert head_at == first_element_end and len(pieces) == 1


def test_required_output_that_is_not_the_form_is_content_and_a_cut_call_keeps_what_was_decoded() -> None:
    plan = tools.plan([WEATHER, TIME], "required")
    assert plan is not None
    text = "I will not call a tool."
    assert _stream(text, plan, random.Random(3)) == (text, []) == (tools.parse(text, plan)[0], [])
    # Cut short (max_tokens) inside the arguments: the call was announced as it was decoded; its arguments
    # are what was decoded, as OpenAI streams them (finish_reason "length" tells the client).
    delta = tools.StreamParser(plan).feed('[{"name":"get_weather","parameters":{"city":"Ro', final=True)
    assert delta.content == ""
    assert [c["function"]["name"] for c in delta.tool_calls if "id" in c] == ["get_weather"]
    assert "".join(c["function"]["arguments"] for c in delta.tool_calls) == '{"city":"Ro'
