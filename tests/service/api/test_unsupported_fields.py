"""Nothing silently ignored: every request field the API does not honour is a 400 naming it, through the official
`openai` client against a real server; the fields README calls harmless are accepted."""

import httpx
import openai
import pytest

MESSAGES = [{"role": "user", "content": "Hello there"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
# Structured outputs and tool calls are honoured: tests/service/api/test_structured_outputs.py.

# (field, value, param): the chat completions fields chatloop does not support yet, each at a value that asks for it.
CHAT_UNSUPPORTED = [
    ("functions", [TOOL["function"]], "functions"),
    ("function_call", {"name": "get_weather"}, "function_call"),
    ("logit_bias", {"1234": 5}, "logit_bias"),
    ("presence_penalty", 0.5, "presence_penalty"),
    ("frequency_penalty", -1, "frequency_penalty"),
    ("modalities", ["text", "audio"], "modalities"),
    ("audio", {"voice": "alloy", "format": "wav"}, "audio"),
    ("prediction", {"type": "content", "content": "Hello"}, "prediction"),
    ("reasoning_effort", "high", "reasoning_effort"),
    ("verbosity", "low", "verbosity"),
    ("web_search_options", {}, "web_search_options"),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
     "messages.0.content"),
]

# The same for the Responses API.
RESPONSES_UNSUPPORTED = [
    ("previous_response_id", "resp_123", "previous_response_id"),
    ("store", True, "store"),
    ("conversation", "conv_123", "conversation"),
    ("background", True, "background"),
    ("tools", [{"type": "function", "name": "get_weather", "parameters": {}}], "tools"),
    ("tool_choice", "required", "tool_choice"),
    ("text", {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}, "text.format"),
    ("text", {"verbosity": "low"}, "text.verbosity"),
    ("reasoning", {"effort": "high"}, "reasoning"),
    ("include", ["message.output_text.logprobs"], "include"),
    ("top_logprobs", 3, "top_logprobs"),
    ("truncation", "auto", "truncation"),
    ("prompt", {"id": "pmpt_1"}, "prompt"),
    ("input", [{"type": "function_call_output", "call_id": "c1", "output": "{}"}], "input"),
    ("input", [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}], "input"),
]

# Accepted and ignored (README, API: "harmless to ignore").
CHAT_HARMLESS = {
    "metadata": {"team": "docs"}, "store": True, "service_tier": "flex", "safety_identifier": "u-1",
    "prompt_cache_key": "k", "prompt_cache_retention": "24h", "parallel_tool_calls": False, "tool_choice": "none",
    "modalities": ["text"], "response_format": {"type": "text"}, "logprobs": False, "presence_penalty": 0,
    "frequency_penalty": 0, "logit_bias": {}, "stream_options": None,
}


def refused(create, **fields) -> dict:
    with pytest.raises(openai.BadRequestError) as caught:
        create(**fields)
    assert caught.value.status_code == 400
    return caught.value.body


@pytest.mark.parametrize(("field", "value", "param"), CHAT_UNSUPPORTED)
def test_unsupported_chat_field_is_a_400_naming_it(client, field, value, param):
    body = {"model": "chatloop", "messages": MESSAGES, "max_tokens": 2} | {field: value}
    error = refused(client.chat.completions.create, **body)
    assert error["param"] == param and "not supported yet" in error["message"], error
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("field", "value", "param"), RESPONSES_UNSUPPORTED)
def test_unsupported_responses_field_is_a_400_naming_it(client, field, value, param):
    body = {"model": "chatloop", "input": "Hello there", "max_output_tokens": 2} | {field: value}
    error = refused(client.responses.create, **body)
    assert error["param"] == param and "not supported yet" in error["message"], error


def test_unknown_fields_are_refused_by_name(client, server):
    error = refused(client.chat.completions.create, model="chatloop", messages=MESSAGES, extra_body={"tempreature": 0})
    assert error == {"message": "Unrecognized request argument supplied: tempreature", "type": "invalid_request_error",
                     "param": "tempreature", "code": "invalid_request"}
    nested = [{"role": "user", "content": "Hi", "cache_control": {"type": "ephemeral"}}]
    assert refused(client.chat.completions.create, model="chatloop", messages=nested)["param"] == \
        "messages.0.cache_control"
    weird = httpx.post(f"{server}/v1/chat/completions", json={"messages": MESSAGES, "a b": 1}).json()["error"]
    assert weird["param"] == "a b"
    assert refused(client.responses.create, model="chatloop", input="Hi", extra_body={"seed": 1})["param"] == "seed"


@pytest.mark.parametrize(("fields", "param"), [
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata.k"),
    ({"user": "u" * 257}, "user"),
    ({"prompt_cache_retention": "forever"}, "prompt_cache_retention"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1", "type": "function"}]}]},
     "messages.0.tool_calls.0.function"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages.0.tool_call_id"),
    ({"messages": [{"role": "user", "content": "42", "tool_call_id": "c1"}]}, "messages.0.tool_call_id"),
    ({"messages": [{"role": "function", "content": "42", "name": "f"}]}, "messages.0.role"),  # deprecated: tool
    ({"tools": [{"type": "function", "function": {"name": "no spaces allowed"}}]}, "tools.0.function.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema"),
])
def test_out_of_range_values_name_their_field(client, fields, param):
    error = refused(client.chat.completions.create, **{"model": "chatloop", "messages": MESSAGES, "max_tokens": 2,
                                                       **fields})
    assert error["param"] == param, error


def test_harmless_fields_are_accepted(client):
    answer = client.chat.completions.create(model="chatloop", messages=[
        {"role": "system", "content": "Be brief", "name": "rules"}, {"role": "user", "content": "Hi", "name": "ann"},
    ], max_tokens=3, temperature=0, **CHAT_HARMLESS)
    plain = client.chat.completions.create(model="chatloop", messages=[
        {"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}], max_tokens=3, temperature=0)
    # Ignored means ignored: the same greedy answer as without them.
    assert answer.choices[0].message.content == plain.choices[0].message.content
    streamed = client.chat.completions.create(model="chatloop", messages=MESSAGES, max_tokens=2, stream=True,
                                              stream_options={"include_usage": True, "include_obfuscation": False})
    assert [c.usage for c in streamed][-1].completion_tokens >= 1


def test_schema_states_what_validation_refuses(server):
    schema = httpx.get(f"{server}/openapi.json").json()["components"]["schemas"]
    chat = schema["ChatCompletionRequest"]
    roles = ("SystemMessage", "UserMessage", "AssistantTurn", "ToolMessage")
    assert chat["additionalProperties"] is False and all(schema[m]["additionalProperties"] is False for m in roles)
    assert chat["properties"]["prediction"]["type"] == "null"  # the one value it accepts
    assert chat["properties"]["top_logprobs"]["anyOf"][0] == {"maximum": 20, "minimum": 0, "type": "integer"}
    assert schema["ResponsesRequest"]["additionalProperties"] is False
