import asyncio

import pytest
import torch

from service.engine.engine import Engine
from service.engine.lora import LoraAdapter
from service.engine.model import load_base_model
from service.engine.requests import EngineError, GenerationRequest, SamplingParams


@pytest.fixture
def base(tiny_settings):
    return load_base_model(tiny_settings)


@pytest.fixture
async def engine(base):
    engine = Engine(base, max_batch_size=8, max_context=256)
    engine.start()
    yield engine
    await asyncio.to_thread(engine.stop)


def prompt(base, text: str) -> list[int]:
    return base.tokenizer(text, add_special_tokens=False)["input_ids"]


async def run(engine: Engine, ids: list[int], n: int = 1, adapter: str = "base", **params) -> tuple[list, list]:
    params = {"max_tokens": 12, "temperature": 0.0} | params
    request = engine.submit(GenerationRequest(ids, SamplingParams(**params), adapter=adapter, n=n))
    texts, finishes = [""] * n, [None] * n
    async for delta in request.stream():
        texts[delta.index] += delta.text
        finishes[delta.index] = delta.finish_reason or finishes[delta.index]
    return texts, finishes


async def test_batched_answers_equal_answers_alone(engine, base):
    prompts = [prompt(base, t) for t in ("Hi", "A much longer prompt than the first one, really", "Third one")]
    alone = [await run(engine, p, max_tokens=20) for p in prompts]
    together = await asyncio.gather(*(run(engine, p, max_tokens=20) for p in prompts))
    assert together == alone


async def test_requests_join_a_running_batch(engine, base):
    long_ids, short_ids = prompt(base, "Tell me a long story"), prompt(base, "Short question with more words here")
    alone_long = await run(engine, long_ids, max_tokens=60)
    alone_short = await run(engine, short_ids, max_tokens=10)
    first = asyncio.create_task(run(engine, long_ids, max_tokens=60))
    while engine.steps == 0 or engine.active_sequences() == 0:
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.02)  # let it decode a few steps alone
    second = await run(engine, short_ids, max_tokens=10)
    assert second == alone_short
    assert await first == alone_long


async def test_max_tokens_ends_with_length_and_counts_tokens(engine, base):
    request = engine.submit(GenerationRequest(prompt(base, "Count"), SamplingParams(max_tokens=7, temperature=1.0)))
    deltas = [d async for d in request.stream()]
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 7


async def test_n_choices_share_a_prompt_and_differ(engine, base):
    texts, finishes = await run(engine, prompt(base, "Say something"), n=3, temperature=1.0, seed=5, max_tokens=15)
    assert len(set(texts)) == 3 and finishes == ["length"] * 3
    again, _ = await run(engine, prompt(base, "Say something"), n=3, temperature=1.0, seed=5, max_tokens=15)
    assert again == texts  # a seed makes the answer reproducible


async def test_stop_string_ends_the_choice(engine, base):
    ids = prompt(base, "Hello")
    (text,), _ = await run(engine, ids, max_tokens=30)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    (cut,), (finish,) = await run(engine, ids, max_tokens=30, stop=(stop,))
    assert finish == "stop" and cut == text[: text.index(stop)]


async def test_cancel_stops_generation_within_a_step(engine, base):
    request = engine.submit(GenerationRequest(prompt(base, "Go on"), SamplingParams(max_tokens=200, temperature=1.0)))
    stream = request.stream()
    await anext(stream)
    request.cancel()
    for _ in range(200):
        if engine.active_sequences() == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.active_sequences() == 0
    steps = engine.steps
    await asyncio.sleep(0.1)
    assert engine.steps == steps  # nothing is decoding any more


async def test_adapters_run_side_by_side_with_their_own_weights(engine, base, tiny_adapter_dir):
    engine.add_adapter("v1", base.with_adapter(LoraAdapter.from_dir(tiny_adapter_dir)))
    ids = prompt(base, "Which policy am I?")
    alone_base = await run(engine, ids, max_tokens=15)
    alone_v1 = await run(engine, ids, max_tokens=15, adapter="v1")
    assert alone_base != alone_v1
    mixed = await asyncio.gather(run(engine, ids, max_tokens=15), run(engine, ids, max_tokens=15, adapter="v1"))
    assert list(mixed) == [alone_base, alone_v1]


async def test_a_failing_request_does_not_kill_the_engine(engine, base):
    bad = engine.submit(GenerationRequest([10**9], SamplingParams(max_tokens=5)))  # id outside the vocabulary
    with pytest.raises(EngineError):
        [d async for d in bad.stream()]
    assert engine.alive
    texts, finishes = await run(engine, prompt(base, "Still there?"), max_tokens=5)
    assert finishes == ["length"] and texts[0]


async def test_context_limit_ends_with_length(base):
    engine = Engine(base, max_batch_size=4, max_context=20)
    engine.start()
    try:
        ids = prompt(base, "one two three four five six seven eight nine ten")
        request = engine.submit(GenerationRequest(ids, SamplingParams(max_tokens=100, temperature=1.0)))
        deltas = [d async for d in request.stream()]
        assert deltas[-1].finish_reason == "length"
        assert len(ids) + deltas[-1].completion_tokens == 20
    finally:
        await asyncio.to_thread(engine.stop)


def test_unknown_adapter_is_refused(base):
    engine = Engine(base)
    with pytest.raises(KeyError):
        asyncio.run(_submit(engine, GenerationRequest([1, 2], SamplingParams(max_tokens=1), adapter="nope")))


async def _submit(engine, request):
    return engine.submit(request)


def test_bf16_engine_greedy_matches_fp32_start(tiny_settings):
    fp32 = load_base_model(tiny_settings)
    bf16 = load_base_model(tiny_settings.model_copy(update={"dtype": "bfloat16"}))
    assert bf16.dtype == torch.bfloat16
    assert bf16.master_linear["model.layers.0.mlp.up_proj"].dtype == torch.float32
    ids = torch.tensor([prompt(fp32, "The capital of France")])
    with torch.no_grad():
        a, b = fp32.model(ids).logits[0, -1], bf16.model(ids).logits[0, -1].float()
    assert torch.allclose(a, b, atol=0.05, rtol=0.05)
