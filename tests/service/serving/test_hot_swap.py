"""Promotion and rollback reach every API replica without a restart, and the label never lies."""

import asyncio
import contextlib
import json
import time

import httpx
import openai
import pytest
from redis.asyncio import Redis

from service.store import registry
from service.store.api_keys import create_key
from tests.models import make_adapter
from tests.server import running_server, tiny_server_env

MESSAGES = [{"role": "user", "content": "Which policy answers?"}]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_model_dir, root / name, seed=seed) for name, seed in (("a", 11), ("b", 12))}


@pytest.fixture
def replicas(tiny_model_dir, tmp_path, redis_url, redis_sync):
    env = tiny_server_env(tiny_model_dir, tmp_path, redis_url)
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(running_server(env, tmp_path / f"replica{i}.log")) for i in range(2)]


def greedy(url: str, model: str = "chatloop", max_tokens: int = 12) -> tuple[str, str]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)
    r = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=max_tokens)
    return r.system_fingerprint, r.choices[0].message.content


def wait_for(url: str, version: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{url}/readyz").json()["production_adapter"] != version:
        assert time.monotonic() < deadline, f"{url} never switched to {version}"
        time.sleep(0.02)


async def registered(redis_url: str, adapters: dict) -> dict[str, str]:
    client = Redis.from_url(redis_url, decode_responses=True)
    versions = {name: await registry.register_dir(client, path) for name, path in adapters.items()}
    await client.aclose()
    return versions


async def promote(redis_url: str, version: str | None = None) -> str:
    client = Redis.from_url(redis_url, decode_responses=True)
    result = await (registry.promote(client, version) if version else registry.rollback(client))
    await client.aclose()
    return result


def test_promotion_and_rollback_reach_every_replica(replicas, adapters, redis_url):
    versions = asyncio.run(registered(redis_url, adapters))
    expected = {v: greedy(replicas[0], model=v)[1] for v in versions.values()}
    expected["base"] = greedy(replicas[0], model="chatloop-base")[1]
    assert len(set(expected.values())) == 3  # three policies that answer differently

    for version in (versions["a"], versions["b"]):
        asyncio.run(promote(redis_url, version))
        for url in replicas:
            wait_for(url, version)
            assert greedy(url) == (version, expected[version])
    assert asyncio.run(promote(redis_url)) == versions["a"]  # rollback
    for url in replicas:
        wait_for(url, versions["a"])
        assert greedy(url) == (versions["a"], expected[versions["a"]])


def test_a_stream_started_before_the_swap_finishes_on_its_adapter(replicas, adapters, redis_url):
    versions = asyncio.run(registered(redis_url, adapters))
    url = replicas[0]
    full = greedy(url, model=versions["a"], max_tokens=120)[1]
    asyncio.run(promote(redis_url, versions["a"]))
    wait_for(url, versions["a"])
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)
    stream = client.chat.completions.create(
        model="chatloop", messages=MESSAGES, temperature=0, max_tokens=120, stream=True
    )
    chunks = [next(stream)]
    asyncio.run(promote(redis_url, versions["b"]))  # swap while the stream is running
    wait_for(url, versions["b"])
    chunks += list(stream)
    assert {c.system_fingerprint for c in chunks} == {versions["a"]}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    assert greedy(url)[0] == versions["b"]


async def test_canary_labels_never_lie_under_load(replicas, adapters, redis_url):
    """Swap back and forth while requests run; every answer must be the one its label's policy gives."""
    versions = await registered(redis_url, adapters)
    expected = {v: greedy(replicas[0], model=v, max_tokens=8)[1] for v in versions.values()}
    expected["base"] = greedy(replicas[0], model="chatloop-base", max_tokens=8)[1]
    clients = [openai.AsyncOpenAI(base_url=f"{u}/v1", api_key="EMPTY", max_retries=0) for u in replicas]
    checked = 0

    async def load(client: openai.AsyncOpenAI, stop: asyncio.Event) -> None:
        nonlocal checked
        while not stop.is_set():
            r = await client.chat.completions.create(
                model="chatloop", messages=MESSAGES, temperature=0, max_tokens=8
            )
            assert r.choices[0].message.content == expected[r.system_fingerprint], r.system_fingerprint
            checked += 1

    stop = asyncio.Event()
    workers = [asyncio.create_task(load(c, stop)) for c in clients for _ in range(3)]
    swaps, deadline = 0, time.monotonic() + 180
    while swaps < 6 or checked < 30:  # by count, not time: a busy machine answers slower
        assert time.monotonic() < deadline and not any(w.done() for w in workers)
        await promote(redis_url, [versions["a"], versions["b"]][swaps % 2])
        swaps += 1
        await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*workers)


def test_the_arena_pits_two_versions_and_reveals_them_after_the_vote(replicas, adapters, redis_url, redis_sync):
    versions = asyncio.run(registered(redis_url, adapters))
    asyncio.run(promote(redis_url, versions["a"]))
    url = replicas[0]
    wait_for(url, versions["a"])
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="chatloop-arena", messages=MESSAGES, temperature=0, max_tokens=12
    )
    answer = raw.parse()
    assert answer.system_fingerprint == "arena" and raw.headers["x-chatloop-adapter"] == "arena"
    logged = json.loads(redis_sync.get(f"chatloop:completion:{answer.id}"))
    served = [c["adapter"] for c in logged["choices"]]
    assert sorted(served) == sorted([versions["a"], versions["b"]])  # production vs the newest other version
    expected = {v: greedy(url, model=v)[1] for v in served}
    assert [c.message.content for c in answer.choices] == [expected[v] for v in served]
    receipt = httpx.post(f"{url}/v1/comparisons", json={"completion_id": answer.id, "preferred": 1}).json()
    assert receipt["adapters"] == served
    key = asyncio.run(admin_key(redis_url))
    board = httpx.get(f"{url}/admin/leaderboard", headers={"Authorization": f"Bearer {key}"}).json()
    top = board["versions"][0]
    assert top["version"] == served[1] and top["votes"] == 1 and top["win_rate"] == 1.0


async def admin_key(redis_url: str) -> str:
    client = Redis.from_url(redis_url, decode_responses=True)
    key, _ = await create_key(client, "admin", "tests")
    await client.aclose()
    return key
