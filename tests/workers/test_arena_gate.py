"""A candidate that passed the offline gate waits in the arena until live votes settle it."""

import asyncio

from redis.asyncio import Redis

from service.feedback.events import AnswerRef, FeedbackEvent
from service.settings import Settings
from service.store import feedback_store, redis_keys, registry, runs
from workers.tasks import settle_arena


async def setup(redis_url: str, adapter_dir, wins: list[bool]) -> tuple[str, str]:
    client = Redis.from_url(redis_url, decode_responses=True)
    production = await registry.register_dir(client, adapter_dir)
    candidate = await registry.register_dir(client, adapter_dir)
    await registry.promote(client, production)
    for i, candidate_won in enumerate(wins):
        completion = f"chatcmpl-{i}"
        await client.set(redis_keys.completion(completion), "{}")
        answers = [AnswerRef(completion_id=completion, choice_index=0, adapter=production),
                   AnswerRef(completion_id=completion, choice_index=1, adapter=candidate)]
        await feedback_store.cast_vote(client, FeedbackEvent(
            kind="comparison", created=1, voter=f"u{i}", prompt=[], conversation="c", answers=answers,
            preferred=1 if candidate_won else 0,
        ))
    await client.aclose()
    return production, candidate


def waiting_run(settings: Settings, candidate: str) -> str:
    r = runs.client(settings)
    runs.update_run(r, "run1", id="run1", status="awaiting_arena", candidate=candidate)
    r.lpush(runs.RUNS, "run1")
    return "run1"


def test_a_candidate_that_wins_the_arena_is_promoted(redis_url, redis_sync, tiny_adapter_dir):
    settings = Settings(redis_url=redis_url, gate_arena_votes=4, gate_arena_min_win_rate=0.6)
    production, candidate = asyncio.run(setup(redis_url, tiny_adapter_dir, [True, True, False]))
    waiting_run(settings, candidate)
    assert settle_arena(settings)["status"] == "awaiting_arena"  # 3 votes of the 4 needed
    asyncio.run(setup_more(redis_url, production, candidate))
    verdict = settle_arena(settings)
    assert verdict["status"] == "promoted" and verdict["votes"] == 4 and verdict["win_rate"] == 0.75
    assert redis_sync.get(registry.PRODUCTION) == candidate


async def setup_more(redis_url: str, production: str, candidate: str) -> None:
    client = Redis.from_url(redis_url, decode_responses=True)
    await client.set(redis_keys.completion("chatcmpl-x"), "{}")
    answers = [AnswerRef(completion_id="chatcmpl-x", choice_index=0, adapter=candidate),
               AnswerRef(completion_id="chatcmpl-x", choice_index=1, adapter=production)]
    await feedback_store.cast_vote(client, FeedbackEvent(
        kind="comparison", created=1, voter="late", prompt=[], conversation="c", answers=answers, preferred=0,
    ))
    await client.aclose()


def test_a_candidate_that_loses_the_arena_is_rejected(redis_url, redis_sync, tiny_adapter_dir):
    settings = Settings(redis_url=redis_url, gate_arena_votes=3)
    production, candidate = asyncio.run(setup(redis_url, tiny_adapter_dir, [False, False, True]))
    waiting_run(settings, candidate)
    assert settle_arena(settings)["status"] == "rejected"
    assert redis_sync.get(registry.PRODUCTION) == production
    assert runs.get_run(runs.client(settings), "run1")["status"] == "rejected"
