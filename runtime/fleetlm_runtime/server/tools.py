"""Tool calling: OpenAI's `tools` and `tool_choice` checked, rendered through the model's own chat template,
the model's output parsed back into OpenAI `tool_calls` (whole, or as streaming deltas).

* **Checking.** Each tool is a function with a name (OpenAI's `^[a-zA-Z0-9_-]{1,64}$`, unique) and a JSON
  Schema for its parameters, which must compile to a grammar (a 400 naming `tools[i].function.parameters`
  otherwise). `tool_choice` is `auto` (the default with tools), `none`, `required` or a named function,
  which must be one of `tools` (a 400 naming `tool_choice` otherwise).
* **Rendering.** `apply_chat_template(messages, tools=...)`: the checkpoint's own template decides how
  tools, assistant tool calls and `tool` results look in the prompt. A template that never mentions tools
  cannot show them to the model: such a request is refused rather than silently answered without tools.
  With `tool_choice: none` the tools are left out of the prompt (vLLM's default) and nothing is parsed.
* **Enforcing.** `required` and a named function are decoded under a grammar (vLLM's approach): a named
  function's output is its arguments, constrained to its parameters schema; `required` is a JSON array of
  at least one `{"name": ..., "parameters": ...}` whose parameters match the named tool's schema (at most
  one element when `parallel_tool_calls` is false). `auto` leaves the model free.
* **Parsing `auto`.** The Hermes/Qwen form, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  (any number, text around them is the message content), and the Llama 3 JSON form, the whole answer one
  JSON object `{"name": ..., "parameters": {...}}` (or several joined by `;`). Only declared tool names
  count as calls; anything else stays content.
* **Streaming.** `StreamParser` turns text pieces into content and tool-call deltas: content is passed on
  except what could still be the start of `<tool_call>`; a call is sent once its closing tag arrives (its
  id, type and name in one delta, its arguments in the next), as OpenAI's client reassembles them. An
  answer that starts with `{` is held to the end and parsed as the Llama 3 form (free text: a call sent
  early could not be taken back if the rest did not parse). `required` output is constrained, so each
  call is streamed as it is decoded: its name once complete, then its arguments piece by piece.
No aiohttp, no engine: pure functions over dicts and text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.structured import formats, spec

MAX_TOOLS = 128
MAX_PARALLEL_CALLS = 16  # `required` without parallel_tool_calls=false: at most this many calls per answer
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"  # Llama 3.1 may open a JSON call with it
_HERMES = re.compile(re.escape(OPEN_TAG) + r"(.*?)" + re.escape(CLOSE_TAG), re.DOTALL)

Mode = Literal["none", "auto", "required", "named"]


class ToolError(request_mod.InvalidParameterError):
    """A bad `tools`, `tool_choice` or tool message; `param` names the field."""


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def as_template_dict(self) -> dict[str, Any]:
        """OpenAI's shape, which HF chat templates (Hermes, Qwen, Llama 3) read."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a request's tools mean for rendering, decoding and parsing."""

    tools: tuple[Tool, ...]
    mode: Mode
    named: str | None = None  # the function, for mode "named"
    constraint: spec.Constraint | None = None  # the grammar for "required" and "named"

    @property
    def render_tools(self) -> list[dict[str, Any]] | None:
        return None if self.mode == "none" or not self.tools else [t.as_template_dict() for t in self.tools]

    @property
    def parses(self) -> bool:
        return self.mode != "none" and bool(self.tools)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t.name for t in self.tools)


def plan(tools: list[Any] | None, tool_choice: Any, *, parallel_tool_calls: bool | None = None) -> ToolPlan | None:
    """None when the request has no tools (and no tool_choice beyond `none`/`auto`); errors name the field."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise ToolError("tool_choice", "tool_choice needs tools")
        return None
    if len(tools) > MAX_TOOLS:
        raise ToolError("tools", f"at most {MAX_TOOLS} tools, got {len(tools)}")
    checked: list[Tool] = []
    for i, tool in enumerate(tools):
        checked.append(_check_tool(tool, f"tools[{i}]"))
    names = [t.name for t in checked]
    if len(set(names)) != len(names):
        raise ToolError("tools", "tool names must be unique")
    by_name = {t.name: t for t in checked}
    if tool_choice is None or tool_choice == "auto":
        return ToolPlan(tools=tuple(checked), mode="auto")
    if tool_choice == "none":
        return ToolPlan(tools=tuple(checked), mode="none")
    if tool_choice == "required":
        limit = 1 if parallel_tool_calls is False else MAX_PARALLEL_CALLS
        schema = {
            "type": "array",
            "minItems": 1,
            "maxItems": limit,
            "items": {"anyOf": [_call_schema(t) for t in checked]},
        }
        constraint = formats.schema_constraint(schema, param="tools")
        return ToolPlan(tools=tuple(checked), mode="required", constraint=constraint)
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ToolError("tool_choice", "a named tool_choice is {'type': 'function', 'function': {'name': ...}}")
        tool = by_name.get(name)
        if tool is None:
            raise ToolError("tool_choice", f"no tool named {name[:64]!r} in tools (known: {', '.join(names)[:300]})")
        constraint = formats.schema_constraint(tool.parameters, param=f"tools[{names.index(name)}].function.parameters")
        return ToolPlan(tools=tuple(checked), mode="named", named=name, constraint=constraint)
    raise ToolError("tool_choice", "must be 'none', 'auto', 'required' or {'type': 'function', 'function': {...}}")


def _check_tool(tool: Any, where: str) -> Tool:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise ToolError(where, "each tool is {'type': 'function', 'function': {'name': ..., 'parameters': ...}}")
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ToolError(f"{where}.function.name", "must match ^[a-zA-Z0-9_-]{1,64}$")
    description = function.get("description") or ""
    if not isinstance(description, str):
        raise ToolError(f"{where}.function.description", "must be a string")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    # Checked (and later compiled) as a grammar: a schema the library refuses is the client's 400.
    formats.schema_constraint(parameters, param=f"{where}.function.parameters")
    return Tool(name=name, description=description, parameters=parameters)


def _call_schema(tool: Tool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "parameters": tool.parameters},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }


# ------------------------------------------------------------------------------------------------
# Messages


def template_message(index: int, message: Any) -> dict[str, Any]:
    """A checked chat message (schemas.ChatMessage) as the template reads it: assistant tool calls with
    their arguments as objects (HF templates serialise them), tool results with their call id."""
    out: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.name:
        out["name"] = message.name
    if message.role == "tool":
        if message.tool_call_id is None:
            raise ToolError(f"messages[{index}].tool_call_id", "a tool message needs the tool_call_id it answers")
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        if message.role != "assistant":
            raise ToolError(f"messages[{index}].tool_calls", "only assistant messages carry tool_calls")
        calls = []
        for j, call in enumerate(message.tool_calls):
            where = f"messages[{index}].tool_calls[{j}]"
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise ToolError(
                    where, "each tool call is {'id', 'type': 'function', 'function': {'name', 'arguments'}}"
                )
            arguments = function.get("arguments", "{}")
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments) if arguments.strip() else {}
                except ValueError:
                    raise ToolError(f"{where}.function.arguments", "must be a JSON string") from None
            calls.append(
                {
                    "id": call.get("id"),
                    "type": "function",
                    "function": {"name": function["name"], "arguments": arguments},
                }
            )
        out["tool_calls"] = calls
    return out


def template_supports_tools(chat_template: Any) -> bool:
    """Whether the template reads `tools` at all (a template that does not would drop them silently)."""
    if isinstance(chat_template, dict):  # named templates: the tool_use one, or the default
        chat_template = chat_template.get("tool_use") or chat_template.get("default")
    return isinstance(chat_template, str) and "tools" in chat_template


# ------------------------------------------------------------------------------------------------
# Parsing


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: str, arguments: Any) -> dict[str, Any]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": text}}


def parse(text: str, tool_plan: ToolPlan) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a whole answer. Content is None when the answer is only tool calls."""
    if tool_plan.mode == "named":
        assert tool_plan.named is not None
        return None, [_call(tool_plan.named, text.strip() or "{}")]
    if tool_plan.mode == "required":
        calls = _required_calls(text, tool_plan.names)
        if calls:
            return None, calls
        return text, []
    if not tool_plan.parses:
        return text, []
    return _parse_free(text, tool_plan.names)


def _parse_free(text: str, names: frozenset[str]) -> tuple[str | None, list[dict[str, Any]]]:
    """A model free to call or not (`auto`): Hermes-style <tool_call> tags first, then Llama's bare JSON."""
    calls, rest = _hermes(text, names)
    if calls:
        return (rest if rest.strip() else None), calls
    calls = _llama_json(text, names)
    if calls:
        return None, calls
    return text, []


def _required_calls(text: str, names: frozenset[str]) -> list[dict[str, Any]]:
    try:
        items = json.loads(text)
    except ValueError:
        return []
    if not isinstance(items, list):
        return []
    return [
        _call(item["name"], item.get("parameters", {}))
        for item in items
        if isinstance(item, dict) and item.get("name") in names
    ]


def _hermes(text: str, names: frozenset[str]) -> tuple[list[dict[str, Any]], str]:
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    last = 0
    for match in _HERMES.finditer(text):
        call = _call_from_json(match.group(1), names, ("arguments", "parameters"))
        if call is None:
            continue
        kept.append(text[last : match.start()])
        last = match.end()
        calls.append(call)
    kept.append(text[last:])
    return calls, "".join(kept).strip()


def _llama_json(text: str, names: frozenset[str]) -> list[dict[str, Any]]:
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG) :].strip()
    if not body.startswith("{"):
        return []
    calls = []
    for part in _split_objects(body):
        call = _call_from_json(part, names, ("parameters", "arguments"))
        if call is None:
            return []  # all or nothing: a half-parsed answer is content
        calls.append(call)
    return calls


def _split_objects(body: str) -> list[str]:
    """`{...}; {...}` (Llama 3's separator for several calls) into its objects, by decoding one at a time."""
    decoder = json.JSONDecoder()
    parts, pos = [], 0
    while pos < len(body):
        try:
            _, end = decoder.raw_decode(body, pos)
        except ValueError:
            return [body]
        parts.append(body[pos:end])
        pos = end
        while pos < len(body) and body[pos] in " \t\r\n;":
            pos += 1
    return parts


def _call_from_json(raw: str, names: frozenset[str], keys: tuple[str, str]) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get(keys[0], value.get(keys[1], {}))
    return _call(value["name"], arguments)


# ------------------------------------------------------------------------------------------------
# Streaming


@dataclass(slots=True)
class Delta:
    """What one streamed piece adds: content text and/or tool-call deltas (OpenAI's chunk shape)."""

    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


class StreamParser:
    """Feeds on text pieces of one choice; yields deltas whose content and tool calls add up to `parse()`."""

    def __init__(self, tool_plan: ToolPlan) -> None:
        self._plan = tool_plan
        self._buffer = ""  # text not yet released
        self._started = False  # any non-blank text seen (decides the Llama 3 JSON form)
        self._hold_all = False
        self._sent_named = False
        self._required = _RequiredCalls(tool_plan.names) if tool_plan.mode == "required" else None
        self.num_calls = 0

    def feed(self, text: str, *, final: bool) -> Delta:
        plan = self._plan
        if plan.mode == "named":
            return self._named(text, final=final)
        if self._required is not None:
            delta = self._required.feed(text, final=final)
            self.num_calls = self._required.num_calls
            return delta
        if not plan.parses:
            return Delta(content=text)
        return self._feed_free(text, final=final)

    def _feed_free(self, text: str, *, final: bool) -> Delta:
        """A model free to call or not (`auto`): text passes on until a call's form shows; Hermes tags are
        parsed as each one closes, the Llama 3 JSON form is held and parsed whole."""
        self._buffer += text
        if not self._started and self._buffer.strip():
            head = self._buffer.lstrip()
            if PYTHON_TAG.startswith(head) and len(head) < len(PYTHON_TAG) and not final:
                return Delta()  # too short to tell the Llama 3 form from text
            self._started = True
            if head.startswith(("{", PYTHON_TAG)):
                self._hold_all = True  # the Llama 3 JSON form is only known whole
        if self._hold_all:
            if not final:
                return Delta()
            content, calls = parse(self._buffer, self._plan)
            self._buffer = ""
            return self._calls_delta(content or "", calls)
        return self._hermes(final=final)

    def _named(self, text: str, *, final: bool) -> Delta:
        # The output is the arguments themselves: the call's head first, then the arguments as they come.
        delta = Delta()
        if not self._sent_named:
            self._sent_named = True
            self.num_calls = 1
            head = {"index": 0, "id": new_call_id(), "type": "function",
                    "function": {"name": self._plan.named, "arguments": ""}}  # fmt: skip
            delta.tool_calls.append(head)
        if text:
            delta.tool_calls.append({"index": 0, "function": {"arguments": text}})
        return delta

    def _hermes(self, *, final: bool) -> Delta:
        content: list[str] = []
        calls: list[dict[str, Any]] = []
        while True:
            buffer = self._buffer
            start = buffer.find(OPEN_TAG)
            if start < 0:
                keep = 0 if final else _partial_suffix(buffer, OPEN_TAG)
                content.append(buffer[: len(buffer) - keep])
                self._buffer = buffer[len(buffer) - keep :]
                break
            end = buffer.find(CLOSE_TAG, start)
            if end < 0:
                content.append(buffer[:start])
                self._buffer = buffer[start:]
                if final:  # an unclosed call at the end is text
                    content.append(self._buffer)
                    self._buffer = ""
                break
            call = _call_from_json(buffer[start + len(OPEN_TAG) : end], self._plan.names, ("arguments", "parameters"))
            if call is None:
                content.append(buffer[: end + len(CLOSE_TAG)])
            else:
                content.append(buffer[:start])
                calls.append(call)
            self._buffer = buffer[end + len(CLOSE_TAG) :]
        text = "".join(content)
        if calls and not text.strip():
            text = ""
        return self._calls_delta(text, calls)

    def _calls_delta(self, content: str, calls: list[dict[str, Any]]) -> Delta:
        delta = Delta(content=content)
        for call in calls:
            delta.tool_calls.extend(_whole_call_deltas(self.num_calls, call))
            self.num_calls += 1
        return delta


def _whole_call_deltas(index: int, call: dict[str, Any]) -> list[dict[str, Any]]:
    """A parsed call as OpenAI streams one: its id, type and name first, then its arguments."""
    head = {"index": index, "id": call["id"], "type": "function",
            "function": {"name": call["function"]["name"], "arguments": ""}}  # fmt: skip
    return [head, {"index": index, "function": {"arguments": call["function"]["arguments"]}}]


class _RequiredCalls:
    """The `required` form, `[{"name": ..., "parameters": {...}}, ...]`, streamed as it is decoded: each
    call's id and name once its name is complete, then its arguments as they come, as OpenAI streams them.
    The grammar guarantees the form, so nothing sent is ever taken back. An element in another form (keys
    the other way round, which the grammar does not produce) is held until it closes and sent whole; an
    answer that is not an array at all is content, as `parse()` makes it."""

    def __init__(self, names: frozenset[str]) -> None:
        self._names = names
        self._text = ""
        self._pos = 0  # scanned up to here
        self._state: Literal["start", "between", "head", "args", "whole", "end"] = "start"
        self._element_start = 0
        self._depth = 0  # brackets open inside the current arguments (or, "whole", the element)
        self._in_string = False
        self._escaped = False
        self.num_calls = 0

    def feed(self, text: str, *, final: bool) -> Delta:
        self._text += text
        delta = Delta()
        while self._pos < len(self._text) and self._state != "end":
            if self._state in ("start", "between"):
                self._between()
            elif self._state == "head":
                if not self._head(delta):
                    break  # the name is not complete yet
            elif self._state == "args":
                self._args(delta)
            else:
                self._whole(delta)
        if final and self.num_calls == 0 and not delta.tool_calls:
            delta.content = self._text  # not the constrained form (cut short, or not an array): text
        return delta

    def _between(self) -> None:
        char = self._text[self._pos]
        if char.isspace() or (char == "," and self._state == "between"):
            self._pos += 1
        elif char == "[" and self._state == "start":
            self._state, self._pos = "between", self._pos + 1
        elif char == "{" and self._state == "between":
            self._state, self._element_start = "head", self._pos
        else:  # "]" ends the array; anything else is not the form
            self._state = "end"

    def _head(self, delta: Delta) -> bool:
        status, name, end = _required_head(self._text, self._element_start)
        if status == "more":
            self._pos = len(self._text)
            return False
        if status == "ok" and name in self._names:
            head = {"index": self.num_calls, "id": new_call_id(), "type": "function",
                    "function": {"name": name, "arguments": ""}}  # fmt: skip
            delta.tool_calls.append(head)
            self.num_calls += 1
            self._state, self._pos, self._depth = "args", end, 0
        else:
            self._state, self._pos, self._depth = "whole", self._element_start, 0
        self._in_string = self._escaped = False
        return True

    def _step(self, char: str) -> None:
        """Track strings and nesting over one character."""
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
        elif char == '"':
            self._in_string = True
        elif char in "{[":
            self._depth += 1
        elif char in "}]":
            self._depth -= 1

    def _args(self, delta: Delta) -> None:
        start, text = self._pos, self._text
        while self._pos < len(text):
            char = text[self._pos]
            if not self._in_string and self._depth == 0 and char in "}]":  # the element's own closing brace
                self._state = "between"
                break
            self._step(char)
            self._pos += 1
        piece = text[start : self._pos].rstrip() if self._state == "between" else text[start : self._pos]
        if piece:
            delta.tool_calls.append({"index": self.num_calls - 1, "function": {"arguments": piece}})
        if self._state == "between":
            self._pos += 1

    def _whole(self, delta: Delta) -> None:
        text = self._text
        while self._pos < len(text):
            self._step(text[self._pos])
            self._pos += 1
            if self._depth == 0:
                call = _call_from_json(text[self._element_start : self._pos], self._names, ("parameters", "arguments"))
                if call is not None:
                    delta.tool_calls.extend(_whole_call_deltas(self.num_calls, call))
                    self.num_calls += 1
                self._state = "between"
                return


_HEAD_TOKENS = ("{", '"name"', ":", None, ",", '"parameters"', ":")  # None: the name, a JSON string


def _required_head(text: str, start: int) -> tuple[Literal["ok", "more", "no"], str, int]:
    """Whether `text[start:]` opens with `{"name": "<name>", "parameters":` (any blanks between): "ok"
    with the name and where the arguments begin, "more" while it still may, "no" when it cannot."""
    pos = start
    name = ""
    for token in _HEAD_TOKENS:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return "more", "", pos
        if token is None:
            decoder = json.JSONDecoder()
            if text[pos] != '"':
                return "no", "", pos
            try:
                name, pos = decoder.raw_decode(text, pos)
            except ValueError:
                closed = re.compile(r'"(?:[^"\\]|\\.)*"').match(text, pos)
                return ("no", "", pos) if closed else ("more", "", pos)
            continue
        available = text[pos : pos + len(token)]
        if not token.startswith(available):
            return "no", "", pos
        if len(available) < len(token):
            return "more", "", pos
        pos += len(token)
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return "ok", name, pos


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag` (held back: it may become one)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
