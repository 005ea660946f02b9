"""Prefix reuse: the longest cached prefix is found, memory stays bounded, and answers do not change."""

import asyncio

import pytest
import torch

from service.engine.engine import Engine
from service.engine.lora import LoraAdapter
from service.engine.model import load_base_model
from service.engine.prefix_cache import MIN_REUSE, PrefixCache
from service.engine.requests import GenerationRequest, Limits, SamplingParams


def kv(n: int, value: float = 0.0) -> torch.Tensor:
    return torch.full((2, 2, 1, n, 4), value)  # (layers, k/v, heads, tokens, dim): 64 bytes a token


def test_lookup_finds_the_longest_shared_prefix_of_the_same_forward():
    cache = PrefixCache(max_bytes=10**6)
    a, b = list(range(100)), list(range(50)) + [999] * 10
    cache.store(1, a, kv(100, 1.0))
    cache.store(1, b, kv(60, 2.0))
    assert cache.lookup(1, [*range(80), 7, 8]) == (80, cache._entries[(1, 1)])
    reused, entry = cache.lookup(1, list(range(50)) + [999] * 20)
    assert reused == 60 and entry.kv[0, 0, 0, 0, 0] == 2.0
    assert cache.lookup(2, a) == (0, None)  # other weights: nothing to reuse
    assert cache.lookup(1, a)[0] == 99  # the last token is always fed, to get its logits
    assert cache.lookup(1, [*range(MIN_REUSE - 1), -1]) == (0, None)  # too short to bother
    assert cache.hits == 3 and cache.reused_tokens == 80 + 60 + 99


def test_memory_is_bounded_least_recently_used_first():
    cache = PrefixCache(max_bytes=3 * (40 * 64 + 40 * 8))
    for i in range(3):
        cache.store(1, [i] * 40, kv(40))
    assert len(cache) == 3
    cache.lookup(1, [0] * 41)  # entry 0 is used again: entry 1 is now the oldest
    cache.store(1, [7] * 40, kv(40))
    assert len(cache) == 3 and cache.lookup(1, [1] * 41) == (0, None) and cache.lookup(1, [0] * 41)[0] == 40
    assert cache.bytes <= cache.max_bytes
    cache.store(1, [9] * 10_000, kv(10_000))  # bigger than the whole budget: not kept, nothing evicted
    assert len(cache) == 3


def test_a_longer_history_replaces_its_own_prefix_and_dropping_a_forward_forgets_it():
    cache = PrefixCache(max_bytes=10**6)
    cache.store(1, list(range(30)), kv(30))
    cache.store(1, list(range(45)), kv(45))
    assert len(cache) == 1 and cache.bytes == kv(45).numel() * 4 + 45 * 8
    cache.store(2, list(range(30)), kv(30))
    cache.drop(1)
    assert len(cache) == 1 and cache.lookup(1, list(range(40)))[0] == 0


@pytest.fixture
def base(tiny_settings):
    return load_base_model(tiny_settings)


async def answer(engine: Engine, ids: list[int], adapter: str = "base", **params) -> str:
    params = {"max_tokens": 16, "temperature": 0.0} | params
    request = engine.submit(GenerationRequest(ids, SamplingParams(**params), adapter=adapter))
    return "".join([d.text async for d in request.stream()])


def conversation(base, turns: list[tuple[str, str]], question: str) -> list[int]:
    messages = [m for user, bot in turns for m in ({"role": "user", "content": user},
                                                   {"role": "assistant", "content": bot})]
    text = base.tokenizer.apply_chat_template(
        [*messages, {"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return base.tokenizer(text, add_special_tokens=False)["input_ids"]


async def two_turns(engine: Engine, base, **params) -> tuple[str, str]:
    first = await answer(engine, conversation(base, [], "Tell me about the sea, please."), **params)
    second = await answer(engine, conversation(base, [("Tell me about the sea, please.", first)], "And rivers?"),
                          **params)
    return first, second


async def test_a_second_turn_reuses_the_first_and_answers_the_same(base):
    limits = Limits(prefix_cache_mb=64)
    engine, plain = Engine(base, 8, 256, limits), Engine(base, 8, 256, Limits(prefix_cache_mb=0))
    for e in (engine, plain):
        e.start()
    try:
        first_turn = len(conversation(base, [], "Tell me about the sea, please."))
        assert await two_turns(engine, base) == await two_turns(plain, base)
        # The whole first prompt is reused (a random model's answer may not survive retokenising, and its
        # first token may merge with the template's newline before it).
        assert engine.prefixes.hits == 1 and engine.prefixes.reused_tokens >= first_turn - 1
        assert plain.prefixes.hits == 0
        sampled = await two_turns(engine, base, temperature=1.0, seed=3)
        assert sampled == await two_turns(plain, base, temperature=1.0, seed=3)  # same seed, same answers
    finally:
        for e in (engine, plain):
            await asyncio.to_thread(e.stop)


async def test_prompts_sharing_a_system_prompt_reuse_it(base):
    engine = Engine(base, 8, 256, Limits(prefix_cache_mb=64))
    engine.start()
    system = {"role": "system", "content": "You answer in one short sentence, politely, in plain English."}
    prompts = [base.tokenizer(base.tokenizer.apply_chat_template(
        [system, {"role": "user", "content": q}], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False)["input_ids"] for q in ("Hi?", "Why is the sky blue?")]
    shared = next(i for i, (a, b) in enumerate(zip(*prompts, strict=False)) if a != b)
    try:
        alone = await answer(engine, prompts[1])
        engine.prefixes.drop(engine._base_forward.serial)
        await answer(engine, prompts[0])
        assert await answer(engine, prompts[1]) == alone
        assert engine.prefixes.hits == 1 and engine.prefixes.reused_tokens == shared
    finally:
        await asyncio.to_thread(engine.stop)


async def test_reloading_an_adapter_forgets_what_its_old_weights_computed(base, tiny_adapter_dir):
    engine = Engine(base, 8, 256, Limits(prefix_cache_mb=64))
    engine.add_adapter("v1", base.with_adapter(LoraAdapter.from_dir(tiny_adapter_dir)))
    engine.start()
    try:
        ids = conversation(base, [], "Which weights answer this question?")
        await answer(engine, ids, adapter="v1")
        assert len(engine.prefixes) >= 1
        engine.add_adapter("v1", base.with_adapter(LoraAdapter.from_dir(tiny_adapter_dir)))
        assert len(engine.prefixes) == 0
        await answer(engine, ids, adapter="v1")
        assert engine.prefixes.hits == 0
    finally:
        await asyncio.to_thread(engine.stop)
