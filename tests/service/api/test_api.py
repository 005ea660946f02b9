"""The API as a client sees it: a real uvicorn process driven by the official openai package."""

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
import redis
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.server import running_server, tiny_server_env

MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_adapter_dir, tmp_path_factory, redis_url):
    data = tmp_path_factory.mktemp("data")
    redis.Redis.from_url(redis_url).flushdb()
    env = tiny_server_env(tiny_model_dir, data, redis_url) | {"CHATLOOP_MAX_REQUEST_BYTES": "100000"}
    subprocess.run(
        [sys.executable, "-m", "service.cli.main", "adapters", "import", str(tiny_adapter_dir), "--version", "v1",
         "--promote"], env={**os.environ, **env}, check=True,
    )
    with running_server(env, data / "server.log", fresh_redis=False) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def aclient(server):
    return openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def greedy(client, **kwargs):
    return client.chat.completions.create(
        **({"model": "chatloop", "messages": MESSAGES, "temperature": 0, "max_tokens": 16} | kwargs)
    )


def test_models_lists_production_base_and_versions(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["chatloop", "chatloop-base", "chatloop-arena", "v1"]


def test_non_stream_completion(client):
    raw = client.chat.completions.with_raw_response.create(
        model="chatloop", messages=MESSAGES, temperature=0, max_tokens=16
    )
    completion = raw.parse()
    assert raw.headers["x-chatloop-adapter"] == "v1"
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    assert completion.system_fingerprint == "v1"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_every_completion_has_a_unique_id(client):
    ids = {greedy(client, max_tokens=2).id for _ in range(5)}
    assert len(ids) == 5


def test_stream_matches_non_stream(client):
    full = greedy(client).choices[0]
    chunks = list(greedy(client, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.message.content
    assert chunks[-1].choices[0].finish_reason == full.finish_reason
    assert chunks[-1].system_fingerprint == "v1"


def test_stream_wire_format_ends_with_done(server):
    body = {"model": "chatloop", "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_stream_usage_chunk(client):
    chunks = list(greedy(client, stream=True, max_tokens=5, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens <= 5
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_streamed_and_not(client):
    completion = greedy(client, n=2, temperature=1.0, seed=3)
    assert [c.index for c in completion.choices] == [0, 1]
    chunks = list(greedy(client, n=2, temperature=1.0, seed=3, stream=True))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}
    for i in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i)
        assert text == completion.choices[i].message.content


def test_stop_strings(client):
    text = greedy(client, max_tokens=30).choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    choice = greedy(client, max_tokens=30, stop=[stop]).choices[0]
    assert choice.finish_reason == "stop" and choice.message.content == text[: text.index(stop)]


def test_logprobs_match_the_model_recomputed(client, tiny_model_dir, redis_url):
    """Greedy: each token's log-probability and its top alternatives are the model's own distribution, recomputed
    here with transformers; streamed they are the same; the completion log keeps the sampled ones."""
    completion = greedy(client, model="chatloop-base", max_tokens=8, logprobs=True, top_logprobs=3)
    content = completion.choices[0].logprobs.content
    assert len(content) == completion.usage.completion_tokens
    assert "".join(t.token for t in content) == completion.choices[0].message.content
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = tokenizer(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False)["input_ids"]
    for entry in content:
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        best = logprobs.topk(3)
        token = next(int(t) for t in best.indices if tokenizer.decode([int(t)]) == entry.token)
        assert entry.logprob == pytest.approx(float(logprobs[token]), abs=1e-3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-3)
        assert entry.top_logprobs[0].token == tokenizer.decode([int(best.indices[0])])
        assert entry.bytes == list(entry.token.encode())
        ids.append(token)

    streamed = greedy(client, model="chatloop-base", max_tokens=8, logprobs=True, top_logprobs=3, stream=True)
    tokens = [t for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for t in chunk.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in tokens] == [(t.token, round(t.logprob, 4)) for t in content]
    logged = json.loads(redis.Redis.from_url(redis_url).get(f"chatloop:completion:{completion.id}"))
    assert logged["choices"][0]["logprobs"] == pytest.approx([t.logprob for t in content])


def test_sampled_logprobs_come_from_the_nucleus_sampled_from(client):
    completion = greedy(client, temperature=0.8, top_p=0.5, max_tokens=12, logprobs=True, n=2, seed=5)
    for choice in completion.choices:
        assert choice.logprobs.content and all(t.top_logprobs == [] for t in choice.logprobs.content)
        # drawn from inside its top_p nucleus: a finite log-probability (outside it would be -9999.0)
        assert all(-9999.0 < t.logprob <= 0 for t in choice.logprobs.content)
    plain = greedy(client, max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_base_and_adapter_are_different_policies(client):
    base = greedy(client, model="chatloop-base")
    tuned = greedy(client, model="v1")
    assert base.system_fingerprint == "base" and tuned.system_fingerprint == "v1"
    assert base.choices[0].message.content != tuned.choices[0].message.content
    assert greedy(client).choices[0].message.content == tuned.choices[0].message.content


async def test_concurrent_streams_equal_sequential_answers(client, aclient):
    prompts = [[{"role": "user", "content": f"Question number {i}" + " more" * i}] for i in range(8)]
    sequential = [greedy(client, messages=m).choices[0].message.content for m in prompts]

    async def one(messages):
        stream = await aclient.chat.completions.create(
            model="chatloop", messages=messages, temperature=0, max_tokens=16, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert await asyncio.gather(*(one(m) for m in prompts)) == sequential


def _wait_idle(server, timeout_s=5.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status = httpx.get(f"{server}/readyz").json()
        if status["active_sequences"] == 0 or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def _steps(server) -> int:
    return httpx.get(f"{server}/readyz").json()["decode_steps"]


LONG = {"model": "chatloop", "messages": MESSAGES, "max_tokens": 220, "temperature": 1.0, "n": 4}


def test_disconnect_cancels_a_stream(server):
    before = _steps(server)
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=LONG | {"stream": True}, timeout=30) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    status = _wait_idle(server)
    assert status["active_sequences"] == 0
    assert status["decode_steps"] - before < 150  # far fewer than the 220 a finished answer needs
    time.sleep(0.2)
    assert _steps(server) == status["decode_steps"]


async def test_disconnect_cancels_a_non_stream_request(server):
    before = _steps(server)
    async with httpx.AsyncClient(timeout=30) as client:
        request = asyncio.create_task(client.post(f"{server}/v1/chat/completions", json=LONG))
        deadline = time.monotonic() + 30
        while httpx.get(f"{server}/readyz").json()["active_sequences"] == 0:  # generating now
            assert time.monotonic() < deadline and not request.done()
            await asyncio.sleep(0.01)
        request.cancel()  # the client goes away mid-answer
        with pytest.raises(asyncio.CancelledError):
            await request
    status = _wait_idle(server)
    assert status["active_sequences"] == 0
    assert 0 < status["decode_steps"] - before < 150


BAD_REQUESTS = [
    ({"messages": []}, 400, "messages"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": [{"content": "no role"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, 400, "messages.0.content"),
    ({"messages": MESSAGES, "temperature": 2.5}, 400, "temperature"),
    ({"messages": MESSAGES, "temperature": -1}, 400, "temperature"),
    ({"messages": MESSAGES, "top_p": 0}, 400, "top_p"),
    ({"messages": MESSAGES, "top_p": 1.5}, 400, "top_p"),
    ({"messages": MESSAGES, "n": 0}, 400, "n"),
    ({"messages": MESSAGES, "n": 50}, 400, "n"),
    ({"messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": 10_000}, 400, "max_tokens"),
    ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": MESSAGES, "stop": ["a", ""]}, 400, "stop"),
    ({"messages": MESSAGES, "stop": 7}, 400, "stop"),
    ({"messages": MESSAGES, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"messages": MESSAGES, "frequency_penalty": -1}, 400, "frequency_penalty"),
    ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"messages": MESSAGES, "top_logprobs": 3}, 400, "top_logprobs"),  # needs logprobs: true
    ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
    ({"messages": MESSAGES, "model": "gpt-17"}, 404, "model"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_REQUESTS)
def test_bad_input_gets_openai_errors(server, body, status, param):
    response = httpx.post(f"{server}/v1/chat/completions", json={"model": "chatloop"} | body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_context_errors_name_the_limit(server):
    body = {"model": "chatloop", "messages": MESSAGES, "max_tokens": 10_000}
    error = httpx.post(f"{server}/v1/chat/completions", json=body).json()["error"]
    assert error["code"] == "context_length_exceeded" and "256" in error["message"]


def test_malformed_json_is_a_400(server):
    response = httpx.post(
        f"{server}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_oversized_body_is_a_413(server):
    body = {"model": "chatloop", "messages": [{"role": "user", "content": "x" * 200_000}]}
    response = httpx.post(f"{server}/v1/chat/completions", json=body)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        greedy(client, model="nope")
    with pytest.raises(openai.BadRequestError):
        greedy(client, temperature=9)


def test_server_still_serves_after_bad_input(client, server):
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    assert greedy(client, max_tokens=3).choices[0].message.content
