"""What one API process holds: the settings, the model, the engine and the adapters it serves."""

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from redis.asyncio import Redis

from service.engine.engine import Engine
from service.engine.model import BaseModel, load_base_model
from service.serving.adapters import AdapterManager, follow_promotions
from service.settings import Settings

log = logging.getLogger(__name__)


StartRun = Callable[[str], str | None]  # trigger -> run id, or None when a run already holds the lock


@dataclass
class AppState:
    settings: Settings
    start_run: StartRun | None = None  # queues a training run; given by whoever starts the server
    base: BaseModel | None = None
    engine: Engine | None = None
    adapters: AdapterManager | None = None
    error: str | None = None
    redis: Redis | None = None
    raw_redis: Redis | None = None  # no decoding: adapter weights are bytes
    _loading: asyncio.Task | None = field(default=None, repr=False)
    _listener: asyncio.Task | None = field(default=None, repr=False)

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.alive

    def start_loading(self) -> None:
        """Load the model in the background so /healthz answers while a first start converts weights."""
        self.redis = Redis.from_url(self.settings.redis_url, decode_responses=True, health_check_interval=30)
        self.raw_redis = Redis.from_url(self.settings.redis_url, health_check_interval=30)
        self._loading = asyncio.create_task(self._load())

    async def _load(self) -> None:
        try:
            if self.settings.threads:
                torch.set_num_threads(self.settings.threads)
            self.base = await asyncio.to_thread(load_base_model, self.settings)
            engine = Engine(self.base, self.settings.max_batch_size, self.settings.max_context)
            self.adapters = AdapterManager(
                engine, self.base, self.redis, self.raw_redis, self.settings.max_loaded_adapters
            )
            await self.adapters.start()
            engine.start()
            self.engine = engine
            self._listener = asyncio.create_task(
                follow_promotions(self.adapters, self.redis, self.settings.adapter_resync_s)
            )
        except Exception as exc:
            log.exception("model loading failed")
            self.error = f"{type(exc).__name__}: {exc}"

    async def close(self) -> None:
        for task in (self._loading, self._listener):
            if task is not None:
                task.cancel()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)
        for client in (self.redis, self.raw_redis):
            if client is not None:
                await client.aclose()
