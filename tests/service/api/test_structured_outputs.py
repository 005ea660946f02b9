"""Structured outputs and tool calls through the official `openai` client, against a server on the real model:
SmolLM2-135M rarely writes valid JSON on its own, so every valid answer here is the grammar's doing."""

import json
import os
import subprocess
import sys

import httpx
import jsonschema
import openai
import pytest

from tests.server import running_server

pytestmark = pytest.mark.real_model

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "city": {"enum": ["Paris", "London", "Tokyo"]},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
ASK = [{"role": "user", "content": "Invent a person and describe them."}]
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather like in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, redis_url):
    data = tmp_path_factory.mktemp("real-data")
    env = {"CHATLOOP_DATA_DIR": str(data), "CHATLOOP_REDIS_URL": redis_url,
           "CHATLOOP_CHAT_REQUESTS_PER_MINUTE": "0", "CHATLOOP_FEEDBACK_REQUESTS_PER_MINUTE": "0"}
    with running_server(env, data / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def person_format(strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}


def test_json_schema_answers_validate_for_every_seed(client):
    for seed in range(10):
        answer = client.chat.completions.create(
            model="chatloop", messages=ASK, response_format=person_format(), seed=seed, temperature=0.8,
            max_tokens=160,
        )
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_schema_streamed_with_n_choices(client):
    stream = client.chat.completions.create(
        model="chatloop", messages=ASK, response_format=person_format(strict=False), n=3, seed=1, max_tokens=160,
        stream=True,
    )
    texts = ["", "", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_answers_are_json_objects(client):
    answer = client.chat.completions.create(
        model="chatloop", messages=[{"role": "user", "content": "Reply in JSON: your name and favourite colour."}],
        response_format={"type": "json_object"}, seed=3, max_tokens=120,
    )
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_the_sdk_parse_helper_reads_a_json_schema_answer(client):
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        name: str
        age: int

    parsed = client.chat.completions.parse(model="chatloop", messages=ASK, response_format=Person, seed=4,
                                           max_tokens=120)
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and person.name


def test_an_uncompilable_schema_is_a_400_naming_it(client):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "strin"}}}}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="chatloop", messages=ASK, response_format=bad)
    assert err.value.body["param"] == "response_format.json_schema.schema" and "strin" in err.value.body["message"]


def test_a_named_tool_call_has_arguments_that_validate(client):
    for seed in range(3):
        answer = client.chat.completions.create(
            model="chatloop", messages=WEATHER_QUESTION, tools=[WEATHER, TIME], seed=seed, max_tokens=80,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False,
        )
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = choice.message.tool_calls
        assert len(calls) == 1 and all(c.id.startswith("call_") and c.type == "function" for c in calls)
        for call in calls:
            assert call.function.name == "get_weather"
            jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_parallel_calls_are_each_a_whole_call_until_the_token_limit(client):
    answer = client.chat.completions.create(
        model="chatloop", messages=WEATHER_QUESTION, tools=[WEATHER, TIME], tool_choice="required", seed=2,
        max_tokens=60,
    )
    choice = answer.choices[0]
    calls = choice.message.tool_calls
    assert calls and choice.finish_reason in ("tool_calls", "length") and len({c.id for c in calls}) == len(calls)
    whole = calls if choice.finish_reason == "tool_calls" else calls[:-1]  # the last may be cut at max_tokens
    for call in whole:
        arguments = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            jsonschema.validate(arguments, WEATHER["function"]["parameters"])
        else:
            assert call.function.name == "get_time" and arguments == {}


def test_required_without_parallel_calls_exactly_one_tool(client):
    answer = client.chat.completions.create(
        model="chatloop", messages=WEATHER_QUESTION, tools=[WEATHER, TIME], tool_choice="required",
        parallel_tool_calls=False, seed=5, max_tokens=80,
    )
    calls = answer.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(calls[0].function.arguments), dict)


def test_a_streamed_tool_call_is_reassembled_by_the_sdk(client):
    with client.chat.completions.stream(
        model="chatloop", messages=WEATHER_QUESTION, tools=[WEATHER], seed=2, max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False,
    ) as stream:
        pieces = [event for event in stream if event.type == "tool_calls.function.arguments.delta"]
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert len(pieces) > 1  # the arguments came in pieces, as they were generated
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    assert "".join(piece.arguments_delta for piece in pieces) == call.function.arguments


def test_a_tool_result_continues_the_conversation(client):
    first = client.chat.completions.create(
        model="chatloop", messages=WEATHER_QUESTION, tools=[WEATHER], tool_choice="required",
        parallel_tool_calls=False, seed=6, max_tokens=80,
    )
    call = first.choices[0].message.tool_calls[0]
    conversation = [
        *WEATHER_QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})},
    ]
    answer = client.chat.completions.create(model="chatloop", messages=conversation, tools=[WEATHER],
                                            tool_choice="none", seed=6, max_tokens=40)
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None


def test_tool_choice_errors_name_the_parameter(client):
    cases = [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
          "tool_choice": "required"}, "tools"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="chatloop", messages=WEATHER_QUESTION, max_tokens=5, **extra)
        assert err.value.body["param"] == param, (extra, err.value.body)


def test_tool_call_and_json_answers_are_rated_compared_and_exported_with_their_calls(client, server, redis_url,
                                                                                      tmp_path):
    calls = client.chat.completions.create(
        model="chatloop", messages=WEATHER_QUESTION, tools=[WEATHER], n=2, seed=8, max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False,
    )
    compared = httpx.post(f"{server}/v1/comparisons", json={"completion_id": calls.id, "preferred": 1}, timeout=30)
    assert compared.status_code == 200 and compared.json()["pairs"] == 1, compared.text
    person = client.chat.completions.create(model="chatloop", messages=ASK, response_format=person_format(), seed=9,
                                            max_tokens=160)
    rated = httpx.post(f"{server}/v1/feedback", json={"completion_id": person.id, "rating": "up"}, timeout=30)
    assert rated.status_code == 200, rated.text

    out = tmp_path / "feedback.jsonl"
    run = subprocess.run([sys.executable, "-m", "service.cli.main", "feedback", "export", "--out", str(out)],
                         env={**os.environ, "CHATLOOP_REDIS_URL": redis_url}, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    pair = next(r for r in records if "chosen" in r)
    for turn, choice in ((pair["chosen"][0], calls.choices[1]), (pair["rejected"][0], calls.choices[0])):
        call = choice.message.tool_calls[0]
        assert turn["tool_calls"] == [{"type": "function", "function": {
            "name": "get_weather", "arguments": json.loads(call.function.arguments)}}]
    assert "get_weather" in pair["prompt"][0]["content"]  # the tools, as the model saw them in its system prompt
    thumb = next(r for r in records if "label" in r)
    assert thumb["label"] is True and json.loads(thumb["completion"][0]["content"]) == json.loads(
        person.choices[0].message.content)
