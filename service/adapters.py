"""Which adapters this process serves, and the names clients use for them.

Model names: `chatloop` is the production policy, `chatloop-base` the base model with no adapter,
and every stored adapter version is also a model of its own name. Versions live as peft adapter
directories under `<data dir>/adapters/<version>/`; they are loaded on first use and evicted (least
recently used, never production) past `max_loaded_adapters`.
"""

import asyncio
import logging
import time
from pathlib import Path

from service.engine import BASE, Engine
from service.lora import CONFIG_FILE, LoraAdapter
from service.model import BaseModel

log = logging.getLogger(__name__)

PRODUCTION_MODEL = "chatloop"
BASE_MODEL = "chatloop-base"
RESERVED = {PRODUCTION_MODEL, BASE_MODEL, BASE}


class UnknownModel(LookupError):
    pass


class AdapterManager:
    def __init__(
        self, engine: Engine, base: BaseModel, store: Path, production: str | None, max_loaded: int
    ) -> None:
        self.engine, self.base, self.store = engine, base, store
        self.production = production or BASE
        self.max_loaded = max_loaded
        self._last_used: dict[str, float] = {}
        self._lock = asyncio.Lock()

    def versions(self) -> list[str]:
        if not self.store.is_dir():
            return []
        return sorted(
            p.name for p in self.store.iterdir() if (p / CONFIG_FILE).exists() and p.name not in RESERVED
        )

    def adapter_for(self, model: str) -> str:
        """The adapter name a model name runs with; UnknownModel if there is none."""
        if model == PRODUCTION_MODEL:
            return self.production
        if model == BASE_MODEL:
            return BASE
        if model in self.engine.adapters or model in self.versions():
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
            model = await asyncio.to_thread(self._build, adapter)
            self.engine.add_adapter(adapter, model)
            log.info("loaded adapter %s in %.0f ms", adapter, 1000 * (time.perf_counter() - started))
            self._evict()

    def _build(self, adapter: str):
        return self.base.with_adapter(LoraAdapter.from_dir(self.store / adapter))

    def _evict(self) -> None:
        loaded = [a for a in self.engine.adapters if a not in (BASE, self.production)]
        loaded.sort(key=lambda a: self._last_used.get(a, 0.0))
        while len(loaded) + (self.production != BASE) > self.max_loaded:
            victim = loaded.pop(0)
            self.engine.remove_adapter(victim)
            log.info("unloaded adapter %s", victim)
