"""Tool calls in the model's own text form: describing the tools, showing earlier calls, constraining and parsing
new ones.

The model writes a call as one line, `<tool_call>{"name": "get_weather", "arguments": {"city":"Paris"}}</tool_call>`,
and several calls as such blocks separated by "\\n" (the Hermes/Qwen convention, which small instruct models have
seen most). Earlier calls are shown to it in exactly the form it is constrained to write (compact arguments), so
the conversation never teaches it a form its grammar refuses. Arguments leave the server as compact JSON strings,
the way OpenAI's `function.arguments` are.
"""

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from llguidance import LLMatcher

from common.tool_text import ARGUMENTS_KEY, CLOSE, HEAD, OPEN, TAIL, as_text, parse_calls

# A function without parameters takes exactly {} (OpenAI: "omitting parameters defines an empty parameter list").
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
# No optional whitespace in constrained arguments: a small model left free to write it can pad a call with
# newlines until max_tokens, and without it the arguments it writes are already the compact JSON we return.
JSON_OPTIONS = {"whitespace_flexible": False}

def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _described(function: dict) -> dict:
    """What the model is told about a function: `strict` is a server setting, not part of its meaning."""
    return {key: function[key] for key in ("name", "description", "parameters") if key in function}


def tools_system_text(tools: list[dict]) -> str:
    """The Hermes/Qwen tools block, for the caller to append to the system prompt (after a blank line)."""
    lines = "\n".join(
        json.dumps({"type": "function", "function": _described(tool["function"])}, ensure_ascii=False)
        for tool in tools
    )
    return (
        "# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{lines}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n"
        f'{OPEN}{{"name": <function-name>, "arguments": <args-json-object>}}{CLOSE}'
    )


def render_messages(messages: list[dict]) -> list[dict]:
    """Messages for a chat template that knows nothing of tools: calls and tool results become plain text."""
    return [as_text(message) for message in messages]


def _functions(tools: list[dict]) -> dict[str, dict]:
    functions: dict[str, dict] = {}
    for tool in tools:
        function = tool["function"]
        if function["name"] in functions:
            raise ValueError(f"two tools are named {function['name']!r}; a call could not say which it means")
        functions[function["name"]] = function
    return functions


def _arguments_schema(function: dict) -> dict:
    """The function's `parameters` as the schema its arguments are constrained by; ValueError naming the function
    when llguidance cannot enforce it (an unknown format, a `not`, a remote $ref...)."""
    schema = dict(function.get("parameters") or NO_PARAMETERS)
    schema.setdefault("type", "object")  # a block's arguments are an object whatever else the schema allows
    if schema["type"] != "object":
        raise ValueError(f"the parameters of function {function['name']!r} must be a JSON schema of type object")
    schema["x-guidance"] = JSON_OPTIONS
    error = LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(schema))
    if error:
        raise ValueError(f"the parameters of function {function['name']!r} cannot be enforced: {error}")
    return schema


def call_grammar(tools: list[dict], choice: str | None, parallel: bool) -> str:
    """A llguidance Lark grammar whose every sentence is tool calls: of any of the tools when `choice` is
    "required" (or None), of the named function only otherwise; one call, or with `parallel` one or more separated
    by "\\n". Each call's arguments follow its function's `parameters`. ValueError for a name not among the tools,
    two tools of one name, or parameters llguidance cannot enforce.

    Literal text and schemas are written with json.dumps: a JSON string is a valid Lark string literal with the
    same meaning, and a schema on one line cannot end the `%json` rule early.
    """
    functions = _functions(tools)
    if not functions:
        raise ValueError("there are no tools to call")
    if choice not in (None, "required"):
        if choice not in functions:
            raise ValueError(f"tool_choice names the function {choice!r}, which is not among the tools")
        functions = {choice: functions[choice]}
    rules = []
    for i, (name, function) in enumerate(functions.items()):
        head = f"{HEAD}{json.dumps(name)}{ARGUMENTS_KEY}"
        rules.append(f"call_{i}: {json.dumps(head)} args_{i} {json.dumps(TAIL)}")
        rules.append(f"args_{i}: %json {json.dumps(_arguments_schema(function))}")
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    calls = " | ".join(f"call_{i}" for i in range(len(functions)))
    return "\n".join([start, f"call: {calls}", *rules]) + "\n"


@dataclass(frozen=True)
class Content:
    """Answer text (lenient mode only)."""

    text: str


@dataclass(frozen=True)
class CallStart:
    """Call `index` (0, 1, ... in the answer) is to `name`; its arguments follow."""

    index: int
    name: str


@dataclass(frozen=True)
class CallArguments:
    """The next piece of call `index`'s arguments."""

    index: int
    fragment: str


Event = Content | CallStart | CallArguments


class CallStream:
    """An answer parsed as it streams, into the events of OpenAI's streamed deltas.

    strict=True: the answer was constrained by `call_grammar`, so it is blocks and nothing else. A call starts
    (CallStart) as soon as its name is complete, and its arguments stream (CallArguments) as they arrive: the
    end of the object is found by following its JSON (strings, escapes, nesting), so nothing is held back, and
    a "}</tool_call>" inside a string value is only text. The arguments are the text as generated, which the
    grammar keeps compact (the same as `parse_calls` returns, but for number spellings such as 1.50). There is no
    Content. An answer cut short (max_tokens, a stop string) ends with its last call as far as it got; text that
    cannot be blocks raises ValueError, since the grammar rules it out.

    strict=False (tool_choice "auto"): the answer is prose or blocks, decided once, by its start.
    - While the text so far, leading whitespace stripped, is a prefix of "<tool_call>", nothing is emitted.
    - If it then differs from "<tool_call>", the answer is prose: all of it is Content from then on, as it
      arrives, and a block later in the prose is only text.
    - If it starts with "<tool_call>", everything is held until finish(), then `parse_calls` decides on the whole
      text: calls (CallStart and one CallArguments of compact JSON each), or, if it is not only well-formed blocks
      (a malformed block, prose after a block, a cut-off answer, a call to a function not in `names`), the whole
      text as one Content and no calls. Waiting for the end is what keeps a call once announced from turning out
      to be prose.

    Either way the Content texts joined are `content`, and each call's fragments joined are its arguments in
    `calls`.
    """

    def __init__(self, strict: bool, names: frozenset[str] | None = None) -> None:
        self.strict = strict
        self.names = names  # lenient: the functions a call may name (None: any)
        self.calls: list[tuple[str, str]] = []
        self.content = ""
        self._pending = ""  # text received and not yet emitted
        self._prose = False  # lenient: the answer was decided to be prose
        self._step: Callable[[list[Event]], bool] = self._head  # strict: the parser's state
        self._depth, self._in_string, self._escaped = 0, False, False  # strict: where in the arguments' JSON

    def push(self, text: str) -> list[Event]:
        if self.strict:
            self._pending += text
            events: list[Event] = []
            while self._pending and self._step(events):
                pass
            return events
        if self._prose:
            return self._say(text)
        self._pending += text
        start = self._pending.lstrip()
        if OPEN.startswith(start) or start.startswith(OPEN):
            return []
        self._prose = True
        text, self._pending = self._pending, ""
        return self._say(text)

    def finish(self) -> list[Event]:
        if self.strict:
            return []
        text, self._pending = self._pending, ""
        calls = parse_calls(text)
        if calls is None or (self.names is not None and any(name not in self.names for name, _ in calls)):
            return self._say(text)
        events: list[Event] = []
        for name, arguments in calls:
            events += [CallStart(len(self.calls), name), CallArguments(len(self.calls), arguments)]
            self.calls.append((name, arguments))
        return events

    def _say(self, text: str) -> list[Event]:
        self.content += text
        return [Content(text)] if text else []

    # The strict parser: each step consumes what it can of `_pending` and says whether the next may go on.

    def _literal(self, literal: str, then: Callable[[list[Event]], bool]) -> bool:
        if self._pending.startswith(literal):
            self._pending, self._step = self._pending[len(literal):], then
            return True
        if literal.startswith(self._pending):
            return False
        raise ValueError(f"a constrained answer is not tool calls: expected {literal!r}, got {self._pending!r}")

    def _head(self, events: list[Event]) -> bool:
        self._pending = self._pending.lstrip()  # between blocks
        return bool(self._pending) and self._literal(HEAD, self._name)

    def _name(self, events: list[Event]) -> bool:
        if not self._pending.startswith('"'):
            raise ValueError(f"a constrained answer is not tool calls: expected a name, got {self._pending!r}")
        escaped = False
        for i, char in enumerate(self._pending[1:], 1):
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                name = json.loads(self._pending[:i + 1])
                events.append(CallStart(len(self.calls), name))
                self.calls.append((name, ""))
                self._pending, self._step = self._pending[i + 1:], self._arguments_key
                self._depth, self._in_string, self._escaped = 0, False, False
                return True
        return False

    def _arguments_key(self, events: list[Event]) -> bool:
        return self._literal(ARGUMENTS_KEY, self._arguments)

    def _arguments(self, events: list[Event]) -> bool:
        if self._depth == 0 and not self._pending.startswith("{"):
            raise ValueError(f"a constrained answer is not tool calls: expected arguments, got {self._pending!r}")
        end = None
        for i, char in enumerate(self._pending):
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
                if self._depth == 0:
                    end = i + 1
                    break
        fragment = self._pending if end is None else self._pending[:end]
        name, arguments = self.calls[-1]
        self.calls[-1] = (name, arguments + fragment)
        events.append(CallArguments(len(self.calls) - 1, fragment))
        self._pending = self._pending[len(fragment):]
        if end is None:
            return False
        self._step = self._tail
        return True

    def _tail(self, events: list[Event]) -> bool:
        return self._literal(TAIL, self._head)
