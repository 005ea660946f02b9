"""The arena: one request answered by two adapter versions, hidden from the user until they vote.

The server picks the pair (production against the newest other version, or against the base),
in random order; the answers stream as choices 0 and 1 labelled "arena", the completion log records
which version wrote which choice, and the vote's receipt reveals them. Votes between versions feed
the leaderboard (service/feedback/leaderboard.py) and, when the gate asks for it, a candidate's promotion.
"""

import asyncio
import random
from collections.abc import AsyncIterator

from redis.asyncio import Redis

from common.models import BASE
from service.engine.engine import Delta, GenerationRequest
from service.errors import APIError
from service.store import registry

ARENA_MODEL = "chatloop-arena"
LABEL = "arena"


async def pick_pair(redis: Redis, production: str, rng: random.Random) -> list[str]:
    challengers = [v for v in reversed(await registry.versions(redis)) if v != production]
    challenger = challengers[0] if challengers else (BASE if production != BASE else None)
    if challenger is None:
        raise APIError(409, "the arena needs two policies; there is only the base so far", "model", "arena_unavailable")
    pair = [production, challenger]
    rng.shuffle(pair)
    return pair


class MergedRequest:
    """Several one-choice engine requests seen as one request whose choice i is request i's answer."""

    def __init__(self, requests: list[GenerationRequest]) -> None:
        self.requests = requests
        self.n = len(requests)

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    async def stream(self) -> AsyncIterator[Delta]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, request: GenerationRequest) -> None:
            try:
                async for delta in request.stream():
                    await queue.put(Delta(index, delta.text, delta.finish_reason, delta.completion_tokens))
            except Exception as exc:
                await queue.put(exc)

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(self.requests)]
        try:
            remaining = self.n
            while remaining:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item.finish_reason is not None:
                    remaining -= 1
                yield item
        finally:
            for task in tasks:
                task.cancel()
