"""POST /v1/responses through the official `openai` client against a real server on the tiny model: the answer is
the chat path's, logged like a chat completion and rateable by its response id."""

import itertools
import json
import time

import httpx
import openai
import pytest
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from service.api.responses import ResponseBuilder, ResponsesRequest, stream_events
from service.store import redis_keys

EVENTS = TypeAdapter(ResponseStreamEvent)
OPENING = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
CLOSING = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


def logged(redis_sync, completion_id: str) -> dict:
    return json.loads(redis_sync.get(redis_keys.completion(completion_id)))


def test_create_answers_like_chat_and_logs_the_answer(client, redis_sync):
    raw = client.responses.with_raw_response.create(
        model="chatloop", instructions="Be brief", input="Tell me a story", max_output_tokens=12, temperature=0,
        metadata={"page": "docs"})
    response = raw.parse()
    Response.model_validate(response.to_dict())  # every field the SDK's type requires, not just what it reads
    assert raw.headers["x-chatloop-adapter"] == "base"
    assert response.id.startswith("resp_") and response.object == "response" and response.metadata == {"page": "docs"}
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    chat = client.chat.completions.create(model="chatloop", max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": "Be brief"}, {"role": "user", "content": "Tell me a story"}])
    # The same greedy answer as chat completions gives the same conversation: one generation path.
    assert response.output_text == chat.choices[0].message.content != ""
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    finish = chat.choices[0].finish_reason
    assert (response.status, message.status) == (("incomplete",) * 2 if finish == "length" else ("completed",) * 2)
    assert (response.incomplete_details is not None) == (finish == "length")
    record = logged(redis_sync, response.id)
    assert record["messages"] == [{"role": "system", "content": "Be brief"},
                                  {"role": "user", "content": "Tell me a story"}]
    assert record["choices"][0]["text"] == response.output_text and record["owner"] == "anonymous"
    assert record["params"] | {"max_tokens": 12, "temperature": 0.0, "n": 1} == record["params"]


def test_a_list_of_messages_is_the_conversation(client, redis_sync):
    response = client.responses.create(model="chatloop", max_output_tokens=2, input=[
        {"role": "developer", "content": "Be kind"},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi "}, {"type": "input_text", "text": "there"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Hello!", "annotations": []}]},
        {"role": "user", "content": "How are you?"},
    ])
    assert logged(redis_sync, response.id)["messages"] == [
        {"role": "system", "content": "Be kind"}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"}]


def test_streamed_events_assemble_into_the_logged_answer(client, redis_sync):
    events = list(client.responses.create(model="chatloop", input="Tell me a story", max_output_tokens=12,
                                          temperature=0, stream=True))
    for event in events:
        EVENTS.validate_python(event.to_dict())
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == [*OPENING, *["response.output_text.delta"] * deltas, *CLOSING, kinds[-1]] and deltas >= 1
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert kinds[-1] == f"response.{final.status}" and final.status in ("completed", "incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-4].text == final.output_text
    assert logged(redis_sync, final.id)["choices"][0]["text"] == text
    whole = client.responses.create(model="chatloop", input="Tell me a story", max_output_tokens=12, temperature=0)
    assert whole.output_text == text and whole.usage.output_tokens == final.usage.output_tokens


def test_the_stream_helper_reads_it(client):
    with client.responses.stream(model="chatloop", input="Hi", max_output_tokens=6, temperature=0) as stream:
        seen = [(event.type, getattr(event, "snapshot", None)) for event in stream]
    snapshots = [s for kind, s in seen if kind == "response.output_text.delta"]
    assert snapshots and all(b.startswith(a) for a, b in itertools.pairwise(snapshots))
    assert seen[-1][0] in ("response.completed", "response.incomplete")


async def test_a_finished_stream_completes_for_the_sdk():
    """The tiny model rarely ends an answer by itself, so the `completed` ending is checked here on a chat stream
    written out by hand: the SDK's own stream state must assemble it into its final response."""
    body = ResponsesRequest(input="Hi")
    chunk = {"id": "r", "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}

    stop = {"id": "r", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    usage = {"id": "r", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}

    async def chat_stream():  # as completions.stream_chunks writes it: one step's events may come in one piece
        yield f"data: {json.dumps(chunk)}\n\n"
        yield f"data: {json.dumps(chunk | {'choices': [{**chunk['choices'][0], 'delta': {'content': 'lo'}}]})}\n\n"
        yield f"data: {json.dumps(stop)}\n\ndata: {json.dumps(usage)}\n\ndata: [DONE]\n\n"

    builder = ResponseBuilder(body, "resp_1", "msg_1", 7)
    sse = "".join([piece async for piece in stream_events(builder, chat_stream())])
    assert sse.endswith("data: [DONE]\n\n")
    state = ResponseStreamState(input_tools=openai.omit, text_format=openai.omit)
    for block in sse.split("\n\n")[:-2]:
        event_line, data_line = block.split("\n")
        payload = json.loads(data_line.removeprefix("data: "))
        assert event_line == f"event: {payload['type']}"
        state.handle_event(EVENTS.validate_python(payload))
    final = state._completed_response
    assert final.status == "completed" and final.output_text == "Hello" and final.usage.total_tokens == 5


def test_a_response_can_be_rated_and_compared(client, server, redis_sync):
    first = client.responses.create(model="chatloop", input="Cheer me up", max_output_tokens=4)
    second = client.responses.create(model="chatloop", input="Cheer me up", max_output_tokens=4)
    thumb = httpx.post(f"{server}/v1/feedback", json={"completion_id": first.id, "rating": "up"})
    assert thumb.status_code == 200 and thumb.json()["status"] == "recorded"
    compared = httpx.post(f"{server}/v1/comparisons", json={
        "answers": [{"completion_id": first.id}, {"completion_id": second.id}], "preferred": 1})
    assert compared.status_code == 200 and compared.json()["pairs"] == 1
    events = [json.loads(fields["event"]) for _, fields in redis_sync.xrange(redis_keys.EVENTS)]
    assert [e["kind"] for e in events] == ["thumb", "comparison"]
    assert events[0]["rating"] == 1 and events[0]["answers"][0]["completion_id"] == first.id
    assert events[0]["answers"][0]["text"] == first.output_text
    assert [a["completion_id"] for a in events[1]["answers"]] == [first.id, second.id]


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"input": "word " * 400}, "input", "context_length_exceeded"),
    ({"input": "Hi", "max_output_tokens": 10_000}, "max_output_tokens", "context_length_exceeded"),
    ({"input": []}, "input", "invalid_request"),
    ({"input": "Hi", "model": "chatloop-arena"}, "model", None),
    ({"input": "Hi", "temperature": 3}, "temperature", "invalid_request"),
])
def test_bad_requests_name_their_field(server, fields, param, code):
    response = httpx.post(f"{server}/v1/responses", json={"model": "chatloop"} | fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code)


def _readyz(server) -> dict:
    return httpx.get(f"{server}/readyz").json()


@pytest.mark.parametrize("read_lines", [1, 12])  # gone before the first token, or in the middle of the answer
def test_a_client_that_leaves_cancels_the_generation(server, read_lines):
    before = _readyz(server)["decode_steps"]
    body = {"model": "chatloop", "input": "Tell me a long story", "max_output_tokens": 220, "stream": True}
    with httpx.stream("POST", f"{server}/v1/responses", json=body, timeout=30) as response:
        lines = response.iter_lines()
        for _ in range(read_lines):
            next(lines)
    deadline = time.monotonic() + 5
    while (status := _readyz(server))["active_sequences"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status["active_sequences"] == 0
    assert status["decode_steps"] - before < 150  # far fewer than the 220 a finished answer needs
