"""Blind pairs: one request answered by two adapter versions, hidden from the user until they vote.

Two ways in. The arena (model `chatloop-arena`, asked for on purpose) pairs production with the candidate
under test, else the newest other version, else the base. The online A/B test (service/feedback/ab.py) takes
a share of the ordinary traffic to `chatloop`: a comparison request (n = 2) gets one answer from production and
one from the candidate, a single-answer request one answer from either at even odds. Either way the response is
labelled with a blind label instead of a version, pairs come in random order, the completion log records which
version wrote which choice, and the vote's receipt reveals them. Blind votes feed the leaderboard
(service/feedback/leaderboard.py) and decide the A/B test.
"""

import asyncio
import random
from collections.abc import AsyncIterator

from redis.asyncio import Redis

from common.models import BASE
from service.engine.engine import Delta, GenerationRequest
from service.errors import APIError
from service.serving.adapters import AdapterManager, AdapterUnavailable
from service.store import ab_tests, registry

ARENA_MODEL = "chatloop-arena"
LABEL = "arena"  # what an arena answer says instead of its versions
AB_LABEL = "ab-test"  # what an A/B answer says instead of its versions


async def pick_pair(redis: Redis, production: str, rng: random.Random) -> list[str]:
    """The arena's pair: production and the candidate under test, else the newest other version, else the base."""
    test = await ab_tests.active(redis)
    if test is not None and test.production == production:
        challenger: str | None = test.candidate
    else:
        challengers = [v for v in reversed(await registry.versions(redis)) if v != production]
        challenger = challengers[0] if challengers else (BASE if production != BASE else None)
    if challenger is None:
        raise APIError(409, "the arena needs two policies; there is only the base so far", "model", "arena_unavailable")
    pair = [production, challenger]
    rng.shuffle(pair)
    return pair


async def ab_versions(redis: Redis, production: str, n: int, share: float, rng: random.Random) -> list[str] | None:
    """For a request to the production model, while a test of a candidate against this production runs and for
    `share` of such requests: who answers each choice. A comparison (n = 2): production and the candidate in random
    order; a single answer: one of them at even odds. None otherwise (and for n > 2, which the test does not use)."""
    if n > 2 or share <= 0 or rng.random() >= share:
        return None
    test = await ab_tests.active(redis)
    if test is None or test.production != production:
        return None
    pair = [production, test.candidate]
    rng.shuffle(pair)
    return pair[:n]


async def ab_answerers(adapters: AdapterManager, production: str, n: int, share: float,
                       rng: random.Random) -> list[str] | None:
    """ab_versions, loaded on this replica: None (production answers, as itself) when the candidate cannot be."""
    versions = await ab_versions(adapters.redis, production, n, share, rng)
    if versions is None:
        return None
    try:
        for version in versions:
            await adapters.ensure_loaded(version)
    except AdapterUnavailable:
        return None
    return versions


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
                    await queue.put(Delta(index, delta.text, delta.finish_reason, delta.completion_tokens,
                                          delta.logprobs))
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
