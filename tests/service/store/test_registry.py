"""The adapter registry against a real Redis."""

import asyncio
import itertools
import json

import pytest
from redis.asyncio import Redis

from service.engine.lora import LoraAdapter
from service.store import registry


@pytest.fixture
async def raw(aredis, redis_url):  # aredis flushed the database
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_register_and_read_back(aredis, raw, tiny_adapter_dir):
    version = await registry.register_dir(aredis, tiny_adapter_dir, {"parent": "base", "metrics": {"kl": 1.5}})
    assert version == "v0001"
    meta = await registry.metadata(aredis, version)
    assert meta["parent"] == "base" and meta["metrics"] == {"kl": 1.5} and meta["adapter_config"]["r"] == 8
    blob = await registry.weights(raw, version)
    assert blob == (tiny_adapter_dir / "adapter_model.safetensors").read_bytes()
    assert LoraAdapter.from_bytes(meta["adapter_config"], blob).deltas()
    assert await registry.versions(aredis) == ["v0001"]


async def test_versions_are_immutable(aredis, tiny_adapter_dir):
    await registry.register_dir(aredis, tiny_adapter_dir, version="v7")
    with pytest.raises(registry.RegistryError):
        await registry.register_dir(aredis, tiny_adapter_dir, version="v7")
    with pytest.raises(registry.RegistryError):
        await registry.register(aredis, "base", b"", {})


async def test_promote_publishes_and_keeps_history(aredis, tiny_adapter_dir):
    a = await registry.register_dir(aredis, tiny_adapter_dir)
    b = await registry.register_dir(aredis, tiny_adapter_dir)
    assert await registry.production(aredis) == "base"
    pubsub = aredis.pubsub()
    await pubsub.subscribe(registry.CHANNEL)
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    assert await registry.promote(aredis, a) == "base"
    assert await registry.promote(aredis, b, reason="gate passed") == a
    messages = [await pubsub.get_message(timeout=1) for _ in range(2)]
    assert [json.loads(m["data"])["version"] for m in messages] == [a, b]
    await pubsub.aclose()
    assert await registry.production(aredis) == b
    assert [(e["version"], e["previous"]) for e in await registry.history(aredis)] == [(b, a), (a, "base")]
    with pytest.raises(registry.RegistryError):
        await registry.promote(aredis, "v9999")


async def test_rollback_walks_back_through_promotions(aredis, tiny_adapter_dir):
    a, b, c = [await registry.register_dir(aredis, tiny_adapter_dir) for _ in range(3)]
    for v in (a, b, c):
        await registry.promote(aredis, v)
    assert await registry.rollback(aredis) == b
    assert await registry.rollback(aredis) == a
    assert await registry.production(aredis) == a
    assert await registry.rollback(aredis) == "base"
    with pytest.raises(registry.RegistryError):
        await registry.rollback(aredis)


async def test_concurrent_promotions_leave_a_consistent_history(aredis, tiny_adapter_dir):
    versions = [await registry.register_dir(aredis, tiny_adapter_dir) for _ in range(5)]
    await asyncio.gather(*(registry.promote(aredis, v) for v in versions))
    entries = list(reversed(await registry.history(aredis)))
    assert entries[0]["previous"] == "base"
    assert all(later["previous"] == earlier["version"] for earlier, later in itertools.pairwise(entries))
    assert await registry.production(aredis) == entries[-1]["version"]
