"""Which adapters this process serves, the names clients use for them, and hot swaps.

Model names: `chatloop` is the production policy, `chatloop-base` the base model with no adapter,
and every adapter version in the registry (service/store/registry.py) is also a model of its own name.
Versions load on first use and are evicted (least recently used, never production) past
`max_loaded_adapters`. A promotion swaps production between decode steps: the new version is merged
beside the old one, new requests go to it, and streams already running finish on the weights they
started with (the engine's batches hold their own reference to those weights).

A version is served only with the weights its registry entry names: a loaded version whose sha256 differs
from the registry's (the name came back with other weights after a Redis restart) is loaded again before it
answers. A version that cannot be loaded (corrupt, or not made for this base) is never served: the replica
keeps serving its last good production, reports the failure (/readyz, /metrics) and retries with backoff.
"""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import torch
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from common.models import BASE
from service.engine.engine import Engine
from service.engine.lora import AdapterError, LoraAdapter
from service.engine.model import BaseModel
from service.errors import APIError
from service.store import ab_tests, registry

log = logging.getLogger(__name__)

PRODUCTION_MODEL = "chatloop"
BASE_MODEL = "chatloop-base"
RETRY_S, MAX_RETRY_S = 1.0, 300.0  # backoff between attempts to load a version that failed: 1, 2, 4 ... 300 s


class UnknownModel(LookupError):
    pass


class AdapterUnavailable(APIError):
    def __init__(self, version: str, error: str) -> None:
        super().__init__(503, f"adapter version {version} cannot be loaded on this replica: {error}", "model",
                         "adapter_unavailable")


@dataclass
class LoadFailure:
    sha256: str | None  # of the weights that failed: other weights under the same name are tried at once
    error: str
    attempts: int
    retry_at: float  # time.monotonic()


class AdapterManager:
    def __init__(self, engine: Engine, base: BaseModel, redis: Redis, raw_redis: Redis, max_loaded: int) -> None:
        self.engine, self.base = engine, base
        self.redis, self.raw_redis = redis, raw_redis  # raw: bytes, for adapter weights
        self.production = BASE  # what this replica serves as `chatloop`
        self.registry_production = BASE  # what the registry's pointer named when last read
        self.max_loaded = max_loaded
        self.swaps = 0  # production changes seen, for metrics and tests
        self.failures: dict[str, LoadFailure] = {}
        self._sha256: dict[str, str] = {}  # loaded version -> sha256 of the weights loaded under its name
        self._last_used: dict[str, float] = {}
        self._lock = asyncio.Lock()

    async def versions(self) -> list[str]:
        return await registry.versions(self.redis)

    async def adapter_for(self, model: str) -> str:
        """The adapter a model name runs with, loaded; UnknownModel if there is none."""
        if model == PRODUCTION_MODEL:
            return self.production
        if model == BASE_MODEL:
            return BASE
        try:
            meta = await registry.metadata(self.redis, model)
        except RedisError:  # cannot check the registry: serve what is loaded, as the production path does
            if model in self.engine.adapters:
                return model
            raise
        if meta is None:
            self._unload(model)  # deleted, or gone with a Redis that lost its data
            raise UnknownModel(model)
        await self._load(model, meta)
        return model

    async def ensure_loaded(self, adapter: str) -> None:
        self._last_used[adapter] = time.monotonic()
        if adapter == BASE or adapter in self.engine.adapters:
            return
        meta = await registry.metadata(self.redis, adapter)
        if meta is None:
            raise AdapterUnavailable(adapter, "it is not in the registry")
        await self._load(adapter, meta)

    async def start(self) -> None:
        """Load production before serving. If this replica cannot load it, serve the version it replaced (what
        the other replicas kept serving) and keep retrying production."""
        await self.sync_production()
        if self.production == self.registry_production:
            return
        entries = await registry.history(self.redis)
        if not entries or entries[0]["version"] != self.registry_production or entries[0]["previous"] == BASE:
            return
        fallback = entries[0]["previous"]
        with contextlib.suppress(AdapterUnavailable):
            if (meta := await registry.metadata(self.redis, fallback)) is not None:
                await self._load(fallback, meta)
                self.production = fallback
                log.warning("serving %s until production %s can be loaded", fallback, self.registry_production)

    async def sync_production(self) -> str:
        """Serve whatever the registry's production pointer names (at start, on a promotion, every resync).

        A version that cannot be loaded is not served: this replica keeps what it serves and retries later.
        """
        version = await registry.production(self.redis)
        self.registry_production = version
        changed = version != self.production
        if version != BASE:
            try:
                meta = await registry.metadata(self.redis, version)
                if meta is None:
                    self._failed(version, None, "it is not in the registry")
                    return self.production
                changed = await self._load(version, meta) or changed
            except AdapterUnavailable:
                if version == self.production:  # its name now stands for other weights: never answer with the old
                    self._swap(BASE)
                return self.production
        if changed:
            self._swap(version)
        return version

    async def preload_candidate(self) -> None:
        """Load the running A/B test's candidate before anyone asks for it: its test needs it on every replica,
        and a promotion after the test is then a pointer flip here, with no merge on the swap's path."""
        test = await ab_tests.active(self.redis)
        if test is None or test.candidate in (BASE, self.production):
            return
        meta = await registry.metadata(self.redis, test.candidate)
        if meta is None:
            return
        self._last_used[test.candidate] = time.monotonic()
        with contextlib.suppress(AdapterUnavailable):  # logged and retried like any load; production is unharmed
            await self._load(test.candidate, meta)

    async def sync(self) -> None:
        """Production, then the candidate that may replace it."""
        await self.sync_production()
        await self.preload_candidate()

    def _swap(self, version: str) -> None:
        previous, self.production = self.production, version
        self.swaps += 1
        log.info("production adapter: %s -> %s", previous, version)
        self._evict()

    @property
    def load_error(self) -> dict | None:
        """Why this replica does not serve the registry's production, if it does not."""
        failure = self.failures.get(self.registry_production)
        if failure is None or self.registry_production == self.production:
            return None
        return {"version": self.registry_production, "error": failure.error, "attempts": failure.attempts,
                "retry_in_s": round(max(0.0, failure.retry_at - time.monotonic()), 1)}

    def retry_at(self) -> float | None:
        """When loading the registry's production is next due another try (time.monotonic()); None if not failing."""
        failure = self.failures.get(self.registry_production)
        return failure.retry_at if failure is not None and self.registry_production != self.production else None

    async def _load(self, version: str, meta: dict) -> bool:
        """Load a version unless its weights are loaded already; True if it (re)loaded. AdapterUnavailable if it
        cannot be loaded (or failed lately and is not due another try)."""
        sha256 = meta.get("sha256")  # None: registered before versions carried one
        if self._is_loaded(version, sha256):
            return False
        async with self._lock:
            if self._is_loaded(version, sha256):
                return False
            failure = self.failures.get(version)
            if failure is not None and failure.sha256 == sha256 and time.monotonic() < failure.retry_at:
                raise AdapterUnavailable(version, failure.error)
            started = time.perf_counter()
            try:
                model, loaded_sha256 = await self._merge(version, meta)
            except Exception as exc:  # whatever is wrong with the weights, the replica must go on serving
                self._failed(version, sha256, f"{type(exc).__name__}: {exc}")
                raise AdapterUnavailable(version, str(exc)) from exc
            self.failures.pop(version, None)
            self.engine.add_adapter(version, model)
            self._sha256[version] = loaded_sha256
            self._last_used[version] = time.monotonic()  # the newest: never the one evicted to make room for it
            log.info("loaded adapter %s in %.0f ms", version, 1000 * (time.perf_counter() - started))
            self._evict()
            return True

    def _is_loaded(self, version: str, sha256: str | None) -> bool:
        return version in self.engine.adapters and sha256 in (None, self._sha256.get(version))

    async def _merge(self, version: str, meta: dict) -> tuple[torch.nn.Module, str]:
        blob = await registry.weights(self.raw_redis, version)
        if blob is None:
            raise AdapterError("its weights are not in the registry")
        sha256 = registry.sha256(blob)
        if meta.get("sha256", sha256) != sha256:
            raise AdapterError("its weights do not match the sha256 registered with them")
        lora = LoraAdapter.from_bytes(meta["adapter_config"], blob)
        return await asyncio.to_thread(self.base.with_adapter, lora), sha256

    def _failed(self, version: str, sha256: str | None, error: str) -> None:
        previous = self.failures.get(version)
        attempts = previous.attempts + 1 if previous is not None and previous.sha256 == sha256 else 1
        delay = min(MAX_RETRY_S, RETRY_S * 2 ** (attempts - 1))
        self.failures[version] = LoadFailure(sha256, error, attempts, time.monotonic() + delay)
        log.error("cannot load adapter %s (attempt %d, next in %.0f s): %s", version, attempts, delay, error)

    def _unload(self, version: str) -> None:
        if version not in (BASE, self.production):
            self.engine.remove_adapter(version)
            self._sha256.pop(version, None)

    def _evict(self) -> None:
        loaded = [a for a in self.engine.adapters if a not in (BASE, self.production)]
        loaded.sort(key=lambda a: self._last_used.get(a, 0.0))
        while len(loaded) + (self.production != BASE) > self.max_loaded:
            victim = loaded.pop(0)
            self._unload(victim)
            log.info("unloaded adapter %s", victim)


async def follow_promotions(manager: AdapterManager, redis: Redis, resync_s: float, retry_s: float = 1.0) -> None:
    """Swap to each promoted version; after a lost connection, catch up from the pointer and listen again.

    The pointer, not the message, is the truth: messages missed while disconnected, or arriving out
    of order, cannot leave a replica on the wrong version, and the pointer is re-read every resync_s.
    """
    while True:
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(registry.CHANNEL)
            await manager.sync()
            await _listen(manager, pubsub, resync_s)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("adapter listener lost its connection; retrying in %.1f s", retry_s)
            await asyncio.sleep(retry_s)
        finally:
            await pubsub.aclose()


async def _listen(manager: AdapterManager, pubsub: PubSub, resync_s: float) -> None:
    """Sync on every message, every resync_s, and whenever a failed production load is due another try, until
    the subscription fails. A half-open connection raises nothing and delivers nothing, so each resync also
    PINGs the subscription: no PONG by the next resync and the connection is given up."""
    next_resync, pong_due = time.monotonic() + resync_s, False
    while True:
        wake = min(next_resync, manager.retry_at() or next_resync)
        message = await pubsub.get_message(timeout=max(0.0, wake - time.monotonic()))
        if message is not None:
            # Anything received proves the connection alive: a half-open one delivers nothing. (Not the type "pong"
            # alone: redis-py 8 can hand a subscription's PONG back as {'type': 'P', 'channel': 'O', 'data': 'N'}.)
            pong_due = False
            if message["type"] == "message":
                await manager.sync()
        now = time.monotonic()
        if now >= next_resync:
            if pong_due:
                raise ConnectionError("no PONG on the adapter subscription since the last resync")
            await pubsub.ping()
            pong_due, next_resync = True, now + resync_s
            await manager.sync()
        elif (retry := manager.retry_at()) is not None and now >= retry:
            await manager.sync_production()
