"""Tool calls' text form, grammar and parsers, against real llguidance and SmolLM2's real tokenizer."""

import json
import random

import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np
import pytest
from transformers import AutoTokenizer

from common.tool_text import call_text, parse_calls
from service.api.tool_calls import (
    CallArguments,
    CallStart,
    CallStream,
    Content,
    call_grammar,
    new_call_id,
    render_messages,
    tools_system_text,
)
from service.engine.model import default_gguf_path

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city", "days"], "additionalProperties": False},
}}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters
# Every answer this one allows is short, so a random walk through the grammar ends.
BOUNDED = {"type": "function", "function": {
    "name": "pick", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", 'say "}</tool_call>"']},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city"], "additionalProperties": False},
}}
TOOLS = [WEATHER, TIME]


@pytest.fixture(scope="module")
def tok():
    gguf = default_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="module")
def lltok(tok):
    return llguidance.hf.from_tokenizer(tok)


def compiled(grammar: str) -> str:
    return llguidance.LLMatcher.grammar_from_lark(grammar)


def matcher(lltok, grammar: str) -> llguidance.LLMatcher:
    m = llguidance.LLMatcher(lltok, compiled(grammar), log_level=0)
    assert not m.is_error(), m.get_error()
    return m


def feed(m: llguidance.LLMatcher, tok, text: str) -> bool:
    """Whether the matcher takes every token of `text`."""
    return all(m.consume_token(t) for t in tok.encode(text, add_special_tokens=False))


def allowed(m: llguidance.LLMatcher, lltok) -> np.ndarray:
    """The ids of the tokens the grammar allows next."""
    bitmask = llguidance.numpy.allocate_token_bitmask(1, lltok.vocab_size)
    llguidance.numpy.fill_next_token_bitmask(m, bitmask, 0)
    bits = np.unpackbits(bitmask[0].view(np.uint8), bitorder="little")[:lltok.vocab_size]
    return np.flatnonzero(bits)


def compact(arguments: str) -> str:
    return json.dumps(json.loads(arguments), separators=(",", ":"), ensure_ascii=False)


def pieces(text: str, rng: random.Random) -> list[str]:
    """`text` cut at random places into pieces of 1 to 6 characters."""
    out, at = [], 0
    while at < len(text):
        step = rng.randint(1, 6)
        out.append(text[at:at + step])
        at += step
    return out


def streamed(stream: CallStream, parts: list[str]) -> tuple[str, list[tuple[str, str]], list]:
    """What the events say, joined: the content, and each call's name and arguments."""
    events = [e for part in parts for e in stream.push(part)] + stream.finish()
    content = "".join(e.text for e in events if isinstance(e, Content))
    calls = [[e.name, ""] for e in events if isinstance(e, CallStart)]
    for e in events:
        if isinstance(e, CallArguments):
            calls[e.index][1] += e.fragment
    assert stream.content == content and stream.calls == [tuple(c) for c in calls]
    return content, [tuple(c) for c in calls], events


# The text form, the system text and rendering


def test_call_text_is_the_documented_form():
    assert call_text("get_weather", {"city": "Paris"}) == (
        '<tool_call>{"name": "get_weather", "arguments": {"city":"Paris"}}</tool_call>')


def test_tools_system_text_lists_each_function_on_one_line():
    text = tools_system_text(TOOLS)
    assert text.startswith("# Tools\n")
    listed = text.split("<tools>\n")[1].split("\n</tools>")[0].splitlines()
    assert [json.loads(line) for line in listed] == [
        {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                          "parameters": WEATHER["function"]["parameters"]}},
        {"type": "function", "function": {"name": "get_time"}},
    ]
    assert text.endswith('<tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call>')


def test_rendered_calls_parse_back_to_the_same_calls():
    calls = [("get_weather", '{"city": "Paris", "days": 3}'), ("get_time", "{}")]
    message = {"role": "assistant", "content": None, "tool_calls": [
        {"id": new_call_id(), "type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}
    [rendered] = render_messages([message])
    assert rendered.keys() == {"role", "content"} and rendered["role"] == "assistant"
    assert rendered["content"].count("\n") == 1  # one block a line
    assert parse_calls(rendered["content"]) == [(n, compact(a)) for n, a in calls]


def test_rendering_text_before_calls_tool_results_and_broken_arguments():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{oops"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21°C"},
        {"role": "assistant", "content": ""},
    ]
    assert render_messages(messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant",
         "content": 'Let me look.\n<tool_call>{"name": "get_weather", "arguments": "{oops"}</tool_call>'},
        {"role": "tool", "content": "<tool_response>\nSunny, 21°C\n</tool_response>"},
        {"role": "assistant", "content": ""},
    ]


def test_new_call_id():
    ids = {new_call_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(i.startswith("call_") and len(i) == 29 and int(i[5:], 16) >= 0 for i in ids)


# The grammar


@pytest.mark.parametrize("choice", ["required", None, "get_weather", "get_time"])
@pytest.mark.parametrize("parallel", [False, True])
def test_call_grammar_validates(lltok, choice, parallel):
    assert llguidance.LLMatcher.validate_grammar(compiled(call_grammar(TOOLS, choice, parallel)), lltok) == ""


def test_call_grammar_escapes_names_and_schemas(lltok, tok):
    odd = {"type": "function", "function": {"name": 'a "quoted"\\name', "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "description": 'a } or " or \\ or\nnewline'}}}}}
    grammar = call_grammar([odd], "required", False)
    assert llguidance.LLMatcher.validate_grammar(compiled(grammar), lltok) == ""
    m = matcher(lltok, grammar)
    assert feed(m, tok, call_text('a "quoted"\\name', {"x": "y"})) and m.is_accepting()


def test_a_named_choice_not_among_the_tools_is_refused():
    with pytest.raises(ValueError, match="get_stock"):
        call_grammar(TOOLS, "get_stock", False)


def test_unenforceable_parameters_and_duplicate_names_are_refused():
    bad = {"type": "function", "function": {"name": "fuzzy", "parameters": {
        "type": "object", "properties": {"x": {"not": {"type": "string"}}}}}}
    with pytest.raises(ValueError, match="fuzzy"):
        call_grammar([WEATHER, bad], "required", False)
    with pytest.raises(ValueError, match="get_time"):
        call_grammar([TIME, TIME], "required", False)
    array = {"type": "function", "function": {"name": "listy", "parameters": {"type": "array"}}}
    with pytest.raises(ValueError, match="listy"):
        call_grammar([array], "required", False)


def test_the_grammar_takes_a_valid_call(lltok, tok):
    m = matcher(lltok, call_grammar(TOOLS, "required", False))
    assert feed(m, tok, call_text("get_weather", {"city": "Paris", "days": 3}))
    assert m.is_accepting()


def test_the_grammar_refuses_arguments_against_the_schema(lltok, tok):
    grammar = call_grammar(TOOLS, "required", False)
    assert not feed(matcher(lltok, grammar), tok, call_text("get_weather", {"city": "Paris", "days": "3"}))
    assert not feed(matcher(lltok, grammar), tok, call_text("get_weather", {"city": "Paris"}))  # days is required
    assert not feed(matcher(lltok, grammar), tok, call_text("get_time", {"tz": "UTC"}))  # takes no parameters
    spaced = '<tool_call>{"name": "get_time", "arguments": { }}</tool_call>'
    assert not feed(matcher(lltok, grammar), tok, spaced)  # arguments are compact


def test_the_mask_excludes_a_string_where_an_integer_goes(lltok, tok):
    m = matcher(lltok, call_grammar(TOOLS, "required", False))
    assert feed(m, tok, '<tool_call>{"name": "get_weather", "arguments": {"city":"Paris","days":')
    quote = tok.encode('"', add_special_tokens=False)
    assert len(quote) == 1 and quote[0] not in allowed(m, lltok)
    assert tok.encode("3", add_special_tokens=False)[0] in allowed(m, lltok)


def test_a_named_choice_refuses_the_other_functions(lltok, tok):
    other = call_text("get_time", {})
    assert not feed(matcher(lltok, call_grammar(TOOLS, "get_weather", False)), tok, other)
    m = matcher(lltok, call_grammar(TOOLS, "get_time", False))
    assert feed(m, tok, other) and m.is_accepting()


def test_one_call_then_only_eos_unless_parallel(lltok, tok):
    call = call_text("get_weather", {"city": "Paris", "days": 3})
    single = matcher(lltok, call_grammar(TOOLS, "required", False))
    assert feed(single, tok, call)
    assert allowed(single, lltok).tolist() == [tok.eos_token_id]
    parallel = matcher(lltok, call_grammar(TOOLS, "required", True))
    assert feed(parallel, tok, call)
    after = allowed(parallel, lltok).tolist()
    assert tok.eos_token_id in after and tok.encode("\n", add_special_tokens=False)[0] in after
    assert feed(parallel, tok, "\n" + call_text("get_time", {})) and parallel.is_accepting()


@pytest.mark.parametrize("seed", range(8))
def test_every_answer_the_grammar_allows_parses_whole_and_streamed(lltok, tok, seed):
    """A random walk through the grammar (any allowed token, EOS when allowed half the time) writes an answer
    that parse_calls reads as calls with valid arguments, and that CallStream, fed token by token, streams as
    the same calls."""
    rng = random.Random(seed)
    m = matcher(lltok, call_grammar([BOUNDED, TIME], "required", True))
    ids: list[int] = []
    while True:
        options = allowed(m, lltok).tolist()
        if tok.eos_token_id in options and (rng.random() < 0.5 or len(ids) > 300):
            break
        ids.append(rng.choice([t for t in options if t != tok.eos_token_id]))
        assert m.consume_token(ids[-1])
    text = tok.decode(ids)
    calls = parse_calls(text)
    assert calls, text
    for name, arguments in calls:
        if name == "pick":
            value = json.loads(arguments)
            assert value["city"] in BOUNDED["function"]["parameters"]["properties"]["city"]["enum"]
            assert 1 <= value.get("days", 1) <= 7
        else:
            assert arguments == "{}"
    parts = [tok.decode([t]) for t in ids]
    assert "".join(parts) == text
    content, streamed_calls, _ = streamed(CallStream(strict=True), parts)
    assert content == "" and streamed_calls == calls


# parse_calls


def test_parse_calls_is_lenient_about_whitespace():
    text = ' \n<tool_call> {"name" : "get_weather",\n "arguments": { "city": "Paris" } }\n</tool_call>' \
           '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n\n'
    assert parse_calls(text) == [("get_weather", '{"city":"Paris"}'), ("get_time", "{}")]


@pytest.mark.parametrize("text", [
    "",
    "  ",
    "The weather is fine.",
    'Sure! <tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
    '<tool_call>{"name": "get_time", "arguments": {}}</tool_call> Done.',
    '<tool_call>{"name": "get_time", "arguments": {}}',
    '<tool_call>{"name": "get_time", "arguments": "{}"}</tool_call>',
    '<tool_call>{"name": "", "arguments": {}}</tool_call>',
    '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
    '<tool_call>{"name": "get_time"}</tool_call>',
    '<tool_call>{"name": "get_time", "arguments": {}, "id": 1}</tool_call>',
    '<tool_call>{"name": "get_time", "arguments": {"x": NaN}}</tool_call>',
    '<tool_call>{"name": "get_time", "arguments": {"x": 1e999}}</tool_call>',
    '<tool_call>[1]</tool_call>',
])
def test_parse_calls_reads_anything_else_as_prose(text):
    assert parse_calls(text) is None


# CallStream

CALLS_TEXT = "\n".join([
    call_text("get_weather", {"city": "Paris", "days": 3}),
    call_text("search", {"q": 'say "}</tool_call>" \\ {[', "filters": [{"a": [1, {}]}, None]}),
    call_text("get_time", {}),
])


@pytest.mark.parametrize("seed", range(20))
def test_strict_stream_in_random_pieces_gives_the_calls(seed):
    content, calls, _ = streamed(CallStream(strict=True), pieces(CALLS_TEXT, random.Random(seed)))
    assert content == "" and calls == parse_calls(CALLS_TEXT)


def test_strict_stream_starts_a_call_at_its_name_and_streams_its_arguments():
    stream = CallStream(strict=True)
    assert stream.push('<tool_call>{"name": "get_wea') == []
    assert stream.push('ther"') == [CallStart(0, "get_weather")]
    assert stream.push(', "arguments": {"city":"Pa') == [CallArguments(0, '{"city":"Pa')]
    assert stream.push('ris"}}</tool') == [CallArguments(0, 'ris"}')]
    assert stream.push("_call>\n") == []
    assert stream.push('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>') == [
        CallStart(1, "get_time"), CallArguments(1, "{}")]
    assert stream.finish() == []
    assert stream.calls == [("get_weather", '{"city":"Paris"}'), ("get_time", "{}")]


def test_strict_stream_cut_short_keeps_the_call_as_far_as_it_got():
    stream = CallStream(strict=True)
    stream.push('<tool_call>{"name": "get_weather", "arguments": {"city":"Pa')
    assert stream.finish() == [] and stream.calls == [("get_weather", '{"city":"Pa')]


@pytest.mark.parametrize("text", ["Hello", '<tool_call>{"nam": ', '<tool_call>{"name": get', '<tool_call>{"name": "f", '
                                  '"args": {}', '<tool_call>{"name": "f", "arguments": []', '<tool_call>{"name": "f", '
                                  '"arguments": {}} </tool_call>'])
def test_strict_stream_refuses_what_the_grammar_rules_out(text):
    with pytest.raises(ValueError, match="not tool calls"):
        CallStream(strict=True).push(text)


PROSE = ["The weather in Paris is mild.", "  <b>bold</b> text", "\n<tool_", "<tool_call" + "\nno",
         'I will call it: <tool_call>{"name": "get_time", "arguments": {}}</tool_call>']


@pytest.mark.parametrize("text", PROSE)
@pytest.mark.parametrize("seed", range(5))
def test_lenient_stream_passes_prose_through(text, seed):
    content, calls, _ = streamed(CallStream(strict=False), pieces(text, random.Random(seed)))
    assert content == text and calls == []


def test_lenient_stream_emits_prose_as_soon_as_it_is_prose():
    stream = CallStream(strict=False)
    assert stream.push("  <tool") == []
    assert stream.push("s are") == [Content("  <tools are")]
    assert stream.push(" <tool_call>") == [Content(" <tool_call>")]
    prose_first = CallStream(strict=False)
    assert prose_first.push('Sure: <tool_call>{"name"') == [Content('Sure: <tool_call>{"name"')]


@pytest.mark.parametrize("seed", range(10))
def test_lenient_stream_gives_calls_at_the_end(seed):
    text = '\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n' + \
           call_text("get_time", {})
    stream = CallStream(strict=False)
    assert [e for part in pieces(text, random.Random(seed)) for e in stream.push(part)] == []
    assert stream.finish() == [CallStart(0, "get_weather"), CallArguments(0, '{"city":"Paris"}'),
                               CallStart(1, "get_time"), CallArguments(1, "{}")]
    assert stream.calls == parse_calls(text) and stream.content == ""


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"</tool_call>',
    call_text("get_time", {}) + "\nand then some prose",
    call_text("get_time", {}) + '\n<tool_call>{"name": "get_time"}</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"ci',
])
@pytest.mark.parametrize("seed", range(3))
def test_lenient_stream_returns_a_malformed_answer_as_content(text, seed):
    content, calls, events = streamed(CallStream(strict=False), pieces(text, random.Random(seed)))
    assert content == text and calls == [] and events == [Content(text)]


def test_lenient_calls_to_functions_not_offered_are_prose():
    text = '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>'
    stream = CallStream(strict=False, names=frozenset({"get_weather"}))
    events = stream.push(text) + stream.finish()
    assert events == [Content(text)] and stream.calls == []
    offered = CallStream(strict=False, names=frozenset({"launch_rockets"}))
    offered.push(text)
    offered.finish()
    assert offered.calls == [("launch_rockets", "{}")]
