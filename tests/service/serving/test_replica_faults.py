"""Replicas under faults: a half-open pub/sub connection, a corrupt adapter promoted, a version name reused with
other weights. Real servers, real Redis (through a proxy that can silence the replica's subscription)."""

import asyncio
import contextlib
import json
import time
from collections.abc import Callable

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from service.store import registry
from service.store.api_keys import create_key
from tests.models import make_adapter
from tests.server import running_server, tiny_server_env
from tests.service.serving.silent_proxy import SilentProxy

MESSAGES = [{"role": "user", "content": "Which policy answers?"}]
RESYNC_S = 2.0


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_model_dir, root / name, seed=seed) for name, seed in (("a", 21), ("b", 22))}


@pytest.fixture(scope="module")
def replica(tiny_model_dir, tmp_path_factory, redis_url):
    """A replica whose every Redis connection goes through a SilentProxy; yields (url, proxy, env)."""
    data = tmp_path_factory.mktemp("replica")
    proxy = SilentProxy(redis_url)
    env = tiny_server_env(tiny_model_dir, data, redis_url) | {"CHATLOOP_ADAPTER_RESYNC_S": str(RESYNC_S)}
    try:
        with running_server(env | {"CHATLOOP_REDIS_URL": proxy.url}, data / "replica.log") as url:
            yield url, proxy, env
    finally:
        proxy.close()


@pytest.fixture
def url(replica, redis_sync):  # redis_sync flushed the database: the replica goes back to the base
    eventually(lambda: ready(replica[0])["production_adapter"] == "base", RESYNC_S + 3)
    return replica[0]


def eventually(check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s} s"
        time.sleep(0.05)


def ready(url: str) -> dict:
    return httpx.get(f"{url}/readyz").json()


def greedy(url: str, model: str = "chatloop") -> tuple[str, str]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)
    r = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=12)
    return r.system_fingerprint, r.choices[0].message.content


async def call(redis_url: str, fn, *args, **kwargs):
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        return await fn(client, *args, **kwargs)
    finally:
        await client.aclose()


def register(redis_url: str, adapter_dir, weights: bytes | None = None) -> str:
    """Register an adapter directory as the next version, optionally with other weight bytes."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    blob = weights if weights is not None else (adapter_dir / "adapter_model.safetensors").read_bytes()

    async def run(client: Redis) -> str:
        version = await registry.next_version(client)
        await registry.register(client, version, blob, {"adapter_config": config})
        return version

    return asyncio.run(call(redis_url, run))


def promote(redis_url: str, version: str, **kwargs) -> None:
    asyncio.run(call(redis_url, registry.promote, version, **kwargs))


def metric(url: str, name: str) -> float:
    samples = {s.name: s.value for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
               for s in f.samples}
    return samples[name]


def test_a_replica_whose_subscription_went_silent_catches_up(url, replica, adapters, redis_url):
    _, proxy, _ = replica
    a, b = register(redis_url, adapters["a"]), register(redis_url, adapters["b"])
    promote(redis_url, a)
    eventually(lambda: ready(url)["production_adapter"] == a, 1.5)  # the message, not the resync
    subscriptions = proxy.subscriptions()
    proxy.silence_pubsub()
    promote(redis_url, b)  # its message is lost in the silent connection
    eventually(lambda: ready(url)["production_adapter"] == b, RESYNC_S + 2)
    assert greedy(url)[0] == b
    # and the replica gives the silent connection up for a new subscription
    eventually(lambda: proxy.subscriptions() > subscriptions, 2 * RESYNC_S + 3)


def test_a_corrupt_adapter_in_production_leaves_replicas_on_the_last_good_one(
    url, replica, adapters, redis_url, tmp_path
):
    a = register(redis_url, adapters["a"])
    expected_a = greedy(url, model=a)
    promote(redis_url, a)
    eventually(lambda: ready(url)["production_adapter"] == a, RESYNC_S + 2)
    weights = (adapters["b"] / "adapter_model.safetensors").read_bytes()
    corrupt = register(redis_url, adapters["b"], weights=weights[: len(weights) // 2])  # a half-written upload
    promote(redis_url, corrupt)

    eventually(lambda: (ready(url)["adapter_error"] or {}).get("version") == corrupt, RESYNC_S + 2)
    assert ready(url)["production_adapter"] == a
    assert greedy(url) == (a, expected_a[1])
    assert metric(url, "chatloop_adapter_load_failing") == 1
    by_name = httpx.post(f"{url}/v1/chat/completions", json={"model": corrupt, "messages": MESSAGES})
    assert by_name.status_code == 503 and by_name.json()["error"]["code"] == "adapter_unavailable"
    time.sleep(3.5)  # retried with backoff (1, 2, 4 s), not every second nor on every resync
    assert ready(url)["adapter_error"]["attempts"] <= 3

    # A replica that starts now is ready, on the version the corrupt one replaced.
    _, _, env = replica
    with running_server(env, tmp_path / "fresh.log", fresh_redis=False) as fresh:
        assert ready(fresh)["production_adapter"] == a and ready(fresh)["adapter_error"]["version"] == corrupt
        assert greedy(fresh) == (a, expected_a[1])
        b = register(redis_url, adapters["b"])
        promote(redis_url, b, expected=corrupt)
        for replica_url in (url, fresh):
            eventually(lambda u=replica_url: ready(u)["production_adapter"] == b, RESYNC_S + 2)
            assert ready(replica_url)["adapter_error"] is None
            assert metric(replica_url, "chatloop_adapter_load_failing") == 0


def test_a_version_name_reused_with_other_weights_is_reloaded(url, adapters, redis_url, redis_sync):
    """A Redis without persistence restarts empty: its counter names the next adapter v0001 again."""
    first = register(redis_url, adapters["a"])
    other = register(redis_url, adapters["b"])
    expected = {name: greedy(url, model=version)[1] for name, version in (("a", first), ("b", other))}
    assert expected["a"] != expected["b"]
    promote(redis_url, first)
    eventually(lambda: ready(url)["production_adapter"] == first, RESYNC_S + 2)
    assert greedy(url) == (first, expected["a"])

    redis_sync.flushdb()  # the restart, as the replica sees it: the same server, its data gone
    reused = register(redis_url, adapters["b"])
    assert reused == first
    promote(redis_url, reused)
    with contextlib.suppress(AssertionError):
        eventually(lambda: greedy(url) == (reused, expected["b"]), RESYNC_S + 2)
    assert greedy(url) == (reused, expected["b"])  # never the old weights under the reused name
    assert greedy(url, model=reused) == (reused, expected["b"])


def test_admin_promotion_is_compare_and_set(url, adapters, redis_url):
    """The issue's case: promote the production version again, then roll back; the rollback must move."""
    key, _ = asyncio.run(call(redis_url, create_key, "admin", "tests"))
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"})
    a, b = register(redis_url, adapters["a"]), register(redis_url, adapters["b"])
    assert admin.post(f"/admin/adapters/{a}/promote").json() == {"production": a, "previous": "base"}
    assert admin.post(f"/admin/adapters/{b}/promote", params={"expected": a}).status_code == 200
    history = admin.get("/admin/adapters").json()["history"]
    again = admin.post(f"/admin/adapters/{b}/promote")
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_production"
    stale = admin.post(f"/admin/adapters/{a}/promote", params={"expected": "base"})
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "production_changed"
    assert admin.post("/admin/rollback", params={"expected": a}).status_code == 409
    assert admin.get("/admin/adapters").json()["history"] == history
    assert admin.post("/admin/rollback", params={"expected": b}).json() == {"production": a}
    eventually(lambda: ready(url)["production_adapter"] == a, RESYNC_S + 2)
    assert admin.post("/admin/adapters/v9999/promote").status_code == 404
