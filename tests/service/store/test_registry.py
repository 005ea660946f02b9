"""The adapter registry against a real Redis."""

import asyncio
import hashlib
import itertools
import json

import pytest
from redis.asyncio import Redis

from service.engine.lora import LoraAdapter
from service.store import ab_tests, registry


@pytest.fixture
async def raw(aredis, redis_url):  # aredis flushed the database
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def register_many(redis, adapter_dir, count: int, keep_candidates: int) -> list[str]:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    blob = (adapter_dir / "adapter_model.safetensors").read_bytes()
    names = [await registry.next_version(redis) for _ in range(count)]
    for name in names:
        await registry.register(redis, name, blob, {"adapter_config": config}, keep_candidates=keep_candidates)
    return names


async def test_register_and_read_back(aredis, raw, tiny_adapter_dir):
    version = await registry.register_dir(aredis, tiny_adapter_dir, {"parent": "base", "metrics": {"kl": 1.5}})
    assert version == "v0001"
    meta = await registry.metadata(aredis, version)
    assert meta["parent"] == "base" and meta["metrics"] == {"kl": 1.5} and meta["adapter_config"]["r"] == 8
    blob = await registry.weights(raw, version)
    assert blob == (tiny_adapter_dir / "adapter_model.safetensors").read_bytes()
    assert meta["sha256"] == hashlib.sha256(blob).hexdigest()
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
    a, b, c = await register_many(aredis, tiny_adapter_dir, 3, keep_candidates=3)
    for v in (a, b, c):
        await registry.promote(aredis, v)
    assert await registry.rollback(aredis) == b
    assert await registry.rollback(aredis) == a
    assert await registry.production(aredis) == a
    assert await registry.rollback(aredis) == "base"
    with pytest.raises(registry.RegistryError):
        await registry.rollback(aredis)


async def test_concurrent_promotions_leave_a_consistent_history(aredis, tiny_adapter_dir):
    versions = await register_many(aredis, tiny_adapter_dir, 5, keep_candidates=5)
    await asyncio.gather(*(registry.promote(aredis, v) for v in versions))
    entries = list(reversed(await registry.history(aredis)))
    assert entries[0]["previous"] == "base"
    assert all(later["previous"] == earlier["version"] for earlier, later in itertools.pairwise(entries))
    assert await registry.production(aredis) == entries[-1]["version"]


async def test_promoting_production_again_is_refused_and_leaves_the_history_alone(aredis, tiny_adapter_dir):
    """The issue's case: promote v3 twice, then roll back; the rollback must leave v3."""
    v1, v2, v3 = await register_many(aredis, tiny_adapter_dir, 3, keep_candidates=3)
    for version in (v1, v2, v3):
        await registry.promote(aredis, version)
    before = await registry.history(aredis)
    pubsub = aredis.pubsub()
    await pubsub.subscribe(registry.CHANNEL)
    await pubsub.get_message(timeout=1)
    with pytest.raises(registry.AlreadyProduction):
        await registry.promote(aredis, v3)
    assert await pubsub.get_message(timeout=0.2) is None  # replicas are not told anything
    await pubsub.aclose()
    assert await registry.history(aredis) == before
    assert await registry.rollback(aredis) == v2


async def test_promotion_and_rollback_check_the_production_the_caller_saw(aredis, tiny_adapter_dir):
    v1, v2, v3 = await register_many(aredis, tiny_adapter_dir, 3, keep_candidates=3)
    await registry.promote(aredis, v1, expected="base")
    await registry.promote(aredis, v2, expected=v1)
    # An operator's emergency rollback to v1 while a run trained on v2: the run's promotion must not undo it.
    assert await registry.rollback(aredis, expected=v2) == v1
    history = await registry.history(aredis)
    with pytest.raises(registry.PromotionConflict) as conflict:
        await registry.promote(aredis, v3, reason="run trained on v2", expected=v2)
    assert conflict.value.current == v1
    with pytest.raises(registry.PromotionConflict):
        await registry.rollback(aredis, expected=v2)
    assert await registry.production(aredis) == v1 and await registry.history(aredis) == history
    assert await registry.promote(aredis, v3, expected=v1) == v1


async def test_rollback_skips_repeats_that_older_histories_hold(aredis, tiny_adapter_dir):
    """Histories written before no-op promotions were refused may hold one version twice in a row."""
    v1, v2 = await register_many(aredis, tiny_adapter_dir, 2, keep_candidates=2)
    for version, previous in ((v1, "base"), (v2, v1), (v2, v2)):
        await aredis.lpush(registry.HISTORY, json.dumps({"version": version, "previous": previous, "at": 1,
                                                        "reason": "", "rollback": False}))
    await aredis.set(registry.PRODUCTION, v2)
    assert await registry.rollback(aredis) == v1


async def test_garbage_collection_keeps_production_history_and_the_newest_candidates(aredis, raw, tiny_adapter_dir):
    names = await register_many(aredis, tiny_adapter_dir, 4, keep_candidates=2)
    assert await registry.versions(aredis) == names[2:]  # never promoted: the newest two stay
    await registry.promote(aredis, names[2])
    await registry.promote(aredis, names[3])
    await registry.rollback(aredis)  # names[3] stays: the history names it
    later = await register_many(aredis, tiny_adapter_dir, 4, keep_candidates=2)
    assert await registry.versions(aredis) == [names[2], names[3], *later[2:]]
    for gone in names[:2] + later[:2]:
        assert await registry.metadata(aredis, gone) is None and await registry.weights(raw, gone) is None
    assert await registry.production(aredis) == names[2]
    assert await registry.rollback(aredis) == "base"


async def test_garbage_collection_spares_the_candidate_under_test(aredis, tiny_adapter_dir):
    first, *_ = await register_many(aredis, tiny_adapter_dir, 1, keep_candidates=1)
    await aredis.set(ab_tests.ACTIVE, json.dumps({"candidate": first, "production": "base"}))
    later = await register_many(aredis, tiny_adapter_dir, 3, keep_candidates=1)
    assert await registry.versions(aredis) == [first, later[-1]]
