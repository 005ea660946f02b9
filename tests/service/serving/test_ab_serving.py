"""The A/B test as users meet it: a share of the requests to `chatloop` is answered by production and the candidate,
blind (a pair for a comparison request, either one for a single answer); the vote on it is a blind outcome with the
versions on record (real server and Redis)."""

import asyncio
import json
import time

import httpx
import openai
import pytest
from redis.asyncio import Redis

from service.feedback.ab import ABTest
from service.store import ab_tests, feedback_store, registry
from tests.models import make_adapter
from tests.server import running_server, tiny_server_env

MESSAGES = [{"role": "user", "content": "Which policy answers?"}]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ab-adapters")
    return [make_adapter(tiny_model_dir, root / name, seed=seed) for name, seed in (("prod", 21), ("cand", 22))]


async def setup_test(redis_url: str, adapters) -> ABTest:
    client = Redis.from_url(redis_url, decode_responses=True)
    production, candidate = [await registry.register_dir(client, path) for path in adapters]
    await registry.promote(client, production)
    test = ABTest(candidate=candidate, production=production, run_id="r1", started=time.time() - 1,
                  deadline=time.time() + 3600)
    await ab_tests.start(client, test)
    await client.aclose()
    return test


def test_comparison_requests_meet_the_candidate_blind(tiny_model_dir, tmp_path, redis_url, redis_sync, adapters):
    test = asyncio.run(setup_test(redis_url, adapters))
    env = tiny_server_env(tiny_model_dir, tmp_path, redis_url) | {"CHATLOOP_AB_SHARE": "1"}
    with running_server(env, tmp_path / "server.log", fresh_redis=False) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)
        many = client.chat.completions.create(model="chatloop", messages=MESSAGES, max_tokens=4, n=3)
        assert many.system_fingerprint == test.production  # three answers: not the test's
        singles = [client.chat.completions.create(model="chatloop", messages=MESSAGES, max_tokens=4, logprobs=True)
                   for _ in range(16)]
        assert {s.system_fingerprint for s in singles} == {"ab-test"}  # one answer, from either, unnamed
        assert all(s.choices[0].logprobs.content for s in singles)  # what the caller asked for still comes
        writers = [json.loads(redis_sync.get(f"chatloop:completion:{s.id}")) for s in singles]
        assert all(w["blind"] for w in writers)
        assert {w["choices"][0]["adapter"] for w in writers} == {test.production, test.candidate}  # 2^-15 to fail
        receipt = httpx.post(f"{url}/v1/feedback", json={"completion_id": singles[0].id, "rating": "up"}).json()
        assert receipt["adapters"] == [writers[0]["choices"][0]["adapter"]]  # the receipt reveals it
        response = client.responses.with_raw_response.create(model="chatloop", input="Which?", max_output_tokens=4)
        assert response.headers["x-chatloop-adapter"] == "ab-test"  # the Responses API's single answers too
        logged = json.loads(redis_sync.get(f"chatloop:completion:{response.parse().id}"))
        assert logged["blind"] and logged["choices"][0]["adapter"] in (test.production, test.candidate)
        pair = client.chat.completions.create(model="chatloop", messages=MESSAGES, max_tokens=4, n=2, seed=3)
        assert pair.system_fingerprint == "ab-test" and len(pair.choices) == 2  # nothing says which is which
        logged = json.loads(redis_sync.get(f"chatloop:completion:{pair.id}"))
        assert logged["blind"] and sorted(c["adapter"] for c in logged["choices"]) == sorted(
            [test.production, test.candidate])
        receipt = httpx.post(f"{url}/v1/comparisons", json={"completion_id": pair.id, "preferred": 0}).json()
        assert sorted(receipt["adapters"]) == sorted([test.production, test.candidate])  # the receipt reveals them

        named = client.chat.completions.create(model=test.candidate, messages=MESSAGES, max_tokens=4, n=2)
        assert named.system_fingerprint == test.candidate  # asked for by name: the caller knows, not blind
        httpx.post(f"{url}/v1/comparisons", json={"completion_id": named.id, "preferred": 0}).raise_for_status()

    async def events() -> list:
        client = Redis.from_url(redis_url, decode_responses=True)
        found = [event for _, event in await feedback_store.all_events(client)]
        await client.aclose()
        return found

    votes = asyncio.run(events())
    assert [(e.kind, e.blind) for e in votes] == [("thumb", True), ("comparison", True), ("comparison", False)]
    winner = votes[1].answers[0]
    assert winner.adapter in (test.production, test.candidate) and winner.temperature == 1.0


def test_replicas_merge_the_candidate_as_its_test_starts(tiny_model_dir, tmp_path, redis_url, adapters):
    """Announced with its test, the candidate is merged on every replica before anyone asks for it (the resync
    is an hour away here, so only the announcement can explain it); its promotion is then a pointer flip."""
    env = tiny_server_env(tiny_model_dir, tmp_path, redis_url) | {"CHATLOOP_ADAPTER_RESYNC_S": "3600"}

    async def scenario(url: str) -> None:
        def ready() -> dict:
            return httpx.get(f"{url}/readyz").json()

        async def until(check, timeout_s: float = 30) -> dict:
            deadline = time.monotonic() + timeout_s
            while not check(state := ready()):
                assert time.monotonic() < deadline, state
                await asyncio.sleep(0.05)
            return state

        client = Redis.from_url(redis_url, decode_responses=True)
        production, candidate = [await registry.register_dir(client, path) for path in adapters]
        await registry.promote(client, production)
        await until(lambda s: s["production_adapter"] == production)
        await ab_tests.start(client, ABTest(candidate=candidate, production=production, run_id="r1",
                                            started=time.time(), deadline=time.time() + 3600))
        await asyncio.sleep(1.0)
        assert candidate not in ready()["loaded_adapters"]  # a test alone tells the replica nothing yet
        await registry.announce(client, candidate)
        state = await until(lambda s: candidate in s["loaded_adapters"])
        assert state["production_adapter"] == production  # loaded beside production, not swapped to
        await client.aclose()

    with running_server(env, tmp_path / "server.log") as url:
        asyncio.run(scenario(url))
