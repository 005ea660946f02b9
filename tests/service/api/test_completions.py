"""completions.py: the engine's queue limit as a 429, the fast chunk format, preparing off the event loop."""

import json

import pytest

from service.api import chunks as chunks_module
from service.api import completions
from service.api.schemas import ChatCompletionRequest
from service.engine.engine import Engine
from service.engine.grammar import Grammars
from service.engine.model import load_base_model
from service.engine.requests import Limits
from service.errors import APIError


@pytest.fixture
def base(tiny_settings):
    return load_base_model(tiny_settings)


@pytest.fixture
def grammars(base):
    return Grammars(base.tokenizer)


def body(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="chatloop", messages=[{"role": "user", "content": "Hello there"}], **fields)


async def test_a_full_queue_is_a_429_with_retry_after_and_queues_nothing(base, grammars, tiny_settings):
    engine = Engine(base, 4, 256, Limits(max_queued_sequences=3, max_queued_per_caller=2))  # not started
    prepared = await completions.prepare_async(
        body(n=2), "base", base.tokenizer, tiny_settings, 256, grammars=grammars, owner="a"
    )
    assert (
        prepared.owner == "a"
        and prepared.prompt_ids
        == completions.prepare(body(n=2), "base", base.tokenizer, tiny_settings, 256, grammars=grammars).prompt_ids
    )
    completions.submit(engine, prepared)
    for owner, n in (("a", 1), ("b", 2)):  # a would have 3 waiting (> 2); everyone 4 (> 3)
        again = completions.prepare(
            body(n=n), "base", base.tokenizer, tiny_settings, 256, grammars=grammars, owner=owner
        )
        with pytest.raises(APIError) as refused:
            completions.submit(engine, again)
        assert refused.value.status == 429 and int(refused.value.headers["Retry-After"]) >= 1
    assert engine.queued_sequences() == 2
    arena = completions.prepare(body(n=2), "arena", base.tokenizer, tiny_settings, 256, grammars=grammars, owner="b")
    arena.choice_adapters = ["base", "base"]  # two one-choice requests: both queue, or neither does
    with pytest.raises(APIError):
        completions.submit(engine, arena)
    assert engine.queued_sequences() == 2
    completions.submit(
        engine, completions.prepare(body(), "base", base.tokenizer, tiny_settings, 256, grammars=grammars, owner="b")
    )
    assert engine.queued_sequences() == 3


@pytest.mark.parametrize("text", ["plain", 'quote " and \\ backslash', "new\nline\ttab", "héllo ✓ 🌊", ""])
def test_the_fast_chunk_is_the_same_json_as_the_plain_one(text):
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m\"x",
            "system_fingerprint": "v0001"}
    chunks = chunks_module.ChunkFormat(head)
    fast, plain = chunks.content(3, text), chunks.chunk(3, {"content": text})
    assert fast.startswith("data: ") and fast.endswith("\n\n")
    assert json.loads(fast[6:]) == json.loads(plain[6:])
