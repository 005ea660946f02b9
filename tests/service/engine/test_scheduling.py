"""Sharing the engine: chunked prefill keeps streams moving, callers are capped, the queue is bounded."""

import asyncio
import time

import pytest

from service.engine.engine import Engine
from service.engine.model import load_base_model
from service.engine.requests import EngineBusy, GenerationRequest, Limits, SamplingParams


@pytest.fixture
def base(tiny_settings):
    return load_base_model(tiny_settings)


def long_prompt(base, words: int) -> list[int]:
    return base.tokenizer(" ".join(f"word{i}" for i in range(words)), add_special_tokens=False)["input_ids"]


async def collect(request: GenerationRequest, stamps: list[float] | None = None) -> str:
    text = ""
    async for delta in request.stream():
        text += delta.text
        if stamps is not None:
            stamps.append(time.perf_counter())
    return text


def greedy(ids: list[int], max_tokens: int, owner: str | None = None) -> GenerationRequest:
    return GenerationRequest(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0), owner=owner)


async def run_alone(base, limits: Limits, ids: list[int], max_tokens: int = 12) -> str:
    engine = Engine(base, 8, 512, limits)
    engine.start()
    try:
        return await collect(engine.submit(greedy(ids, max_tokens)))
    finally:
        await asyncio.to_thread(engine.stop)


async def test_a_chunked_prefill_gives_the_same_answer(base):
    ids = long_prompt(base, 120)
    assert len(ids) > 200
    whole = await run_alone(base, Limits(prefill_chunk=1024, prefix_cache_mb=0), ids)
    assert await run_alone(base, Limits(prefill_chunk=16, prefix_cache_mb=0), ids) == whole


async def test_running_streams_keep_decoding_while_a_long_prompt_joins(base):
    engine = Engine(base, 8, 512, Limits(prefill_chunk=16, prefix_cache_mb=0))
    engine.start()
    try:
        short = long_prompt(base, 3)
        running_stamps: list[float] = []
        running = asyncio.create_task(collect(engine.submit(greedy(short, 200)), running_stamps))
        while len(running_stamps) < 3:
            await asyncio.sleep(0.005)
        joined_at, joining_stamps = time.perf_counter(), []
        joining = engine.submit(greedy(long_prompt(base, 120), 4))  # > 200 tokens: 13+ chunks of 16
        await collect(joining, joining_stamps)
        during = [t for t in running_stamps if joined_at < t < joining_stamps[0]]
        assert len(during) >= 10  # a decode step between chunks, not one long stall
        running.cancel()
    finally:
        await asyncio.to_thread(engine.stop)


async def test_one_caller_cannot_take_every_row(base):
    engine = Engine(base, 8, 512, Limits(max_sequences_per_caller=2, prefix_cache_mb=0))
    ids = long_prompt(base, 4)
    greedy_caller = [engine.submit(greedy(ids, 40, owner="greedy")) for _ in range(4)]
    polite = engine.submit(greedy(ids, 3, owner="polite"))
    stamps = {i: [] for i in range(5)}
    engine.start()
    try:
        tasks = [asyncio.create_task(collect(r, stamps[i])) for i, r in enumerate([*greedy_caller, polite])]
        await asyncio.gather(*tasks)
    finally:
        await asyncio.to_thread(engine.stop)
    # The polite caller went ahead of the greedy caller's third and fourth requests, which waited their turn.
    assert stamps[4][-1] < min(stamps[2][0], stamps[3][0])
    assert max(stamps[0][-1], stamps[1][-1]) <= min(stamps[2][0], stamps[3][0])


async def test_the_queue_is_bounded_overall_and_per_caller(base):
    engine = Engine(base, 8, 512, Limits(max_queued_sequences=5, max_queued_per_caller=3))
    ids = long_prompt(base, 2)
    # Not started: nothing leaves the queue.
    engine.submit(GenerationRequest(ids, SamplingParams(max_tokens=2), n=2, owner="a"))
    with pytest.raises(EngineBusy):
        engine.submit(GenerationRequest(ids, SamplingParams(max_tokens=2), n=2, owner="a"))  # a: 4 > 3
    engine.submit(GenerationRequest(ids, SamplingParams(max_tokens=2), n=3, owner="b"))
    with pytest.raises(EngineBusy) as refused:
        engine.submit(GenerationRequest(ids, SamplingParams(max_tokens=2), owner="c"))  # everyone: 6 > 5
    assert refused.value.retry_after_s >= 1
    assert engine.queued_sequences() == 5
    engine.start()
    try:
        while engine.queued_sequences():
            await asyncio.sleep(0.01)
        engine.submit(GenerationRequest(ids, SamplingParams(max_tokens=2), owner="c"))  # room again
    finally:
        await asyncio.to_thread(engine.stop)


async def test_rows_of_very_different_lengths_decode_in_segments_as_they_would_alone(base):
    limits = Limits(prefill_chunk=1024, prefix_cache_mb=0)
    short, long = long_prompt(base, 3), long_prompt(base, 120)
    alone = [await run_alone(base, limits, ids, 30) for ids in (short, long)]
    engine = Engine(base, 8, 512, limits)
    engine.start()
    try:
        first = asyncio.create_task(collect(engine.submit(greedy(short, 30))))
        while engine.steps < 3:
            await asyncio.sleep(0.005)
        second = asyncio.create_task(collect(engine.submit(greedy(long, 30))))
        segments = 0
        while not second.done():
            segments = max([segments, *(len(rows.segments) for rows in list(engine._groups.values()))])
            await asyncio.sleep(0.002)
        assert [await first, await second] == alone
        assert segments == 2  # the long prompt joined as a segment of its own: no 200 columns of padding
    finally:
        await asyncio.to_thread(engine.stop)
