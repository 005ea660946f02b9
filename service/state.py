"""What one API process holds: the settings, the model, the engine and the adapters it serves."""

import asyncio
import logging
from dataclasses import dataclass, field

import torch
from redis.asyncio import Redis

from service.adapters import AdapterManager
from service.engine import Engine
from service.model import BaseModel, load_base_model
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class AppState:
    settings: Settings
    base: BaseModel | None = None
    engine: Engine | None = None
    adapters: AdapterManager | None = None
    error: str | None = None
    redis: Redis | None = None
    _loading: asyncio.Task | None = field(default=None, repr=False)

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.alive

    def start_loading(self) -> None:
        """Load the model in the background so /healthz answers while a first start converts weights."""
        self.redis = Redis.from_url(self.settings.redis_url, decode_responses=True, health_check_interval=30)
        self._loading = asyncio.create_task(self._load())

    async def _load(self) -> None:
        try:
            if self.settings.threads:
                torch.set_num_threads(self.settings.threads)
            self.base = await asyncio.to_thread(load_base_model, self.settings)
            engine = Engine(self.base, self.settings.max_batch_size, self.settings.max_context)
            self.adapters = AdapterManager(
                engine, self.base, self.settings.adapters_dir, self.settings.production_adapter,
                self.settings.max_loaded_adapters,
            )
            await self.adapters.ensure_loaded(self.adapters.production)
            engine.start()
            self.engine = engine
        except Exception as exc:
            log.exception("model loading failed")
            self.error = f"{type(exc).__name__}: {exc}"

    async def close(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)
        if self.redis is not None:
            await self.redis.aclose()
