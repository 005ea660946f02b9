"""Tool calls in the model's own text form, shared by the API (which writes and parses them) and the feedback
records (which export them in TRL's conversational form and read them back).

The model writes a call as one line, `<tool_call>{"name": "get_weather", "arguments": {"city":"Paris"}}</tool_call>`,
and several calls as such blocks separated by "\n" (the Hermes/Qwen convention, which small instruct models have
seen most). A tool's result is shown to it as `<tool_response>\n...\n</tool_response>` in a "tool" message.
`canonical_calls` and `as_messages` turn the text of an answer or a conversation into OpenAI/TRL messages with
`tool_calls` only where writing those back (`as_text`) gives the very same text: an export never changes what the
policy wrote or saw.
"""

import json
import re

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME_KEY, ARGUMENTS_KEY = '{"name": ', ', "arguments": '
HEAD = OPEN + NAME_KEY  # what every block starts with, up to its name
TAIL = "}" + CLOSE  # what every block ends with, after its arguments

_SPACE = re.compile(r"\s*")


def _finite(value: str) -> float:
    number = float(value)
    if number in (float("inf"), float("-inf")):  # 1e999: Python reads it, JSON cannot write it back
        raise ValueError(f"number out of range: {value}")
    return number


def _no_constant(value: str) -> float:
    raise ValueError(f"not JSON: {value}")  # NaN and Infinity, which Python's json accepts and clients do not


_DECODER = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant)


def _compact(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def call_text(name: str, arguments: object) -> str:
    """One call in the model's text form; `arguments` is the JSON value to embed (normally an object)."""
    return f"{HEAD}{json.dumps(name)}{ARGUMENTS_KEY}{_compact(arguments)}{TAIL}"



def parse_calls(text: str) -> list[tuple[str, str]] | None:
    """The calls of an answer that is nothing but well-formed blocks (whitespace aside), as (name, compact JSON
    arguments); None when it is anything else, i.e. prose. A block's JSON is exactly a non-empty string "name" and
    an object "arguments"."""
    calls, at = [], _SPACE.match(text).end()
    while at < len(text):
        if not text.startswith(OPEN, at):
            return None
        try:
            block, at = _DECODER.raw_decode(text, _SPACE.match(text, at + len(OPEN)).end())
        except ValueError:
            return None
        at = _SPACE.match(text, at).end()
        if not (text.startswith(CLOSE, at) and isinstance(block, dict) and block.keys() == {"name", "arguments"}
                and isinstance(block["name"], str) and block["name"] and isinstance(block["arguments"], dict)):
            return None
        calls.append((block["name"], _compact(block["arguments"])))
        at = _SPACE.match(text, at + len(CLOSE)).end()
    return calls or None


def canonical_calls(text: str) -> list[tuple[str, object]] | None:
    """The calls of a text that is exactly the blocks `call_text` writes ("\n" between them), as (name, arguments
    value); None for any other text, prose or a call written some other way."""
    calls = parse_calls(text)
    if not calls:
        return None
    parsed = [(name, json.loads(arguments)) for name, arguments in calls]
    return parsed if "\n".join(call_text(n, a) for n, a in parsed) == text else None


RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>\n", "\n</tool_response>"


def as_message(message: dict) -> dict:
    """One message of the text form in OpenAI/TRL's structured form (tool_calls, tool results); any other message
    as it is. TRL's chat templates take `arguments` as an object."""
    role, content = message["role"], message["content"]
    if role == "assistant" and (calls := canonical_calls(content)):
        return {"role": "assistant", "content": "",
                "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}
    if role == "tool" and content.startswith(RESPONSE_OPEN) and content.endswith(RESPONSE_CLOSE):
        return {"role": "tool", "content": content[len(RESPONSE_OPEN):-len(RESPONSE_CLOSE)]}
    return message


def as_text(message: dict) -> dict:
    """The inverse of `as_message`: role and content, tool calls and results written in the text form."""
    role, content = message["role"], message.get("content") or ""
    if role == "tool":
        return {"role": role, "content": f"{RESPONSE_OPEN}{content}{RESPONSE_CLOSE}"}
    calls = message.get("tool_calls") or []
    blocks = [call_text(c["function"]["name"], arguments_value(c["function"]["arguments"])) for c in calls]
    return {"role": role, "content": "\n".join(filter(None, [content, *blocks]))}


def arguments_value(arguments: object) -> object:
    """A call's arguments as the JSON value to embed: an object as it is, a JSON string parsed, and text that is
    not JSON as a JSON string (so the block stays well-formed)."""
    if not isinstance(arguments, str):
        return arguments
    try:
        return _DECODER.decode(arguments)
    except ValueError:
        return arguments
