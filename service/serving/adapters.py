"""Which adapters this process serves, the names clients use for them, and hot swaps.

Model names: `chatloop` is the production policy, `chatloop-base` the base model with no adapter,
and every adapter version in the registry (service/store/registry.py) is also a model of its own name.
Versions load on first use and are evicted (least recently used, never production) past
`max_loaded_adapters`. A promotion swaps production between decode steps: the new version is merged
beside the old one, new requests go to it, and streams already running finish on the weights they
started with (the engine's batches hold their own reference to those weights).
"""

import asyncio
import logging
import time

from redis.asyncio import Redis

from common.models import BASE
from service.engine.engine import Engine
from service.engine.lora import LoraAdapter
from service.engine.model import BaseModel
from service.store import registry

log = logging.getLogger(__name__)

PRODUCTION_MODEL = "chatloop"
BASE_MODEL = "chatloop-base"


class UnknownModel(LookupError):
    pass


class AdapterManager:
    def __init__(self, engine: Engine, base: BaseModel, redis: Redis, raw_redis: Redis, max_loaded: int) -> None:
        self.engine, self.base = engine, base
        self.redis, self.raw_redis = redis, raw_redis  # raw: bytes, for adapter weights
        self.production = BASE
        self.max_loaded = max_loaded
        self.swaps = 0  # production changes seen, for metrics and tests
        self._last_used: dict[str, float] = {}
        self._lock = asyncio.Lock()

    async def versions(self) -> list[str]:
        return await registry.versions(self.redis)

    async def adapter_for(self, model: str) -> str:
        """The adapter a model name runs with; UnknownModel if there is none."""
        if model == PRODUCTION_MODEL:
            return self.production
        if model == BASE_MODEL:
            return BASE
        if model in self.engine.adapters or await registry.metadata(self.redis, model) is not None:
            return model
        raise UnknownModel(model)

    async def ensure_loaded(self, adapter: str) -> None:
        self._last_used[adapter] = time.monotonic()
        if adapter in self.engine.adapters:
            return
        async with self._lock:
            if adapter in self.engine.adapters:
                return
            started = time.perf_counter()
            meta = await registry.metadata(self.redis, adapter)
            blob = await registry.weights(self.raw_redis, adapter)
            if meta is None or blob is None:
                raise UnknownModel(adapter)
            lora = LoraAdapter.from_bytes(meta["adapter_config"], blob)
            model = await asyncio.to_thread(self.base.with_adapter, lora)
            self.engine.add_adapter(adapter, model)
            log.info("loaded adapter %s in %.0f ms", adapter, 1000 * (time.perf_counter() - started))
            self._evict()

    async def sync_production(self) -> str:
        """Serve whatever the registry's production pointer names (at start, on a promotion, on reconnect)."""
        version = await registry.production(self.redis)
        if version != self.production:
            await self.ensure_loaded(version)
            previous, self.production = self.production, version
            self.swaps += 1
            log.info("production adapter: %s -> %s", previous, version)
            self._evict()
        return version

    def _evict(self) -> None:
        loaded = [a for a in self.engine.adapters if a not in (BASE, self.production)]
        loaded.sort(key=lambda a: self._last_used.get(a, 0.0))
        while len(loaded) + (self.production != BASE) > self.max_loaded:
            victim = loaded.pop(0)
            self.engine.remove_adapter(victim)
            log.info("unloaded adapter %s", victim)


async def follow_promotions(manager: AdapterManager, redis: Redis, retry_s: float = 1.0) -> None:
    """Swap to each promoted version; after a lost connection, catch up from the pointer and listen again.

    The pointer, not the message, is the truth: messages missed while disconnected, or arriving out
    of order, cannot leave a replica on the wrong version.
    """
    while True:
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(registry.CHANNEL)
            await manager.sync_production()
            async for message in pubsub.listen():
                if message["type"] == "message":
                    await manager.sync_production()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("adapter listener lost its connection; retrying in %.1f s", retry_s)
            await asyncio.sleep(retry_s)
        finally:
            await pubsub.aclose()
