"""The vote script and the "new since training" count, against a real Redis."""

import asyncio

import pytest

from service.feedback.events import AnswerRef, FeedbackEvent
from service.store import feedback_store, redis_keys


async def completion(redis, completion_id: str) -> None:
    await redis.set(redis_keys.completion(completion_id), "{}", ex=600)


def thumb(completion_id: str, rating: int = 1, voter: str = "anonymous") -> FeedbackEvent:
    return FeedbackEvent(
        kind="thumb", created=1, voter=voter, prompt=[{"role": "user", "content": "q"}], conversation="c",
        answers=[AnswerRef(completion_id=completion_id, text="a")], rating=rating,
    )


async def test_vote_on_a_missing_completion_writes_nothing(aredis):
    with pytest.raises(feedback_store.CompletionGone):
        await feedback_store.cast_vote(aredis, thumb("gone"))
    assert await aredis.keys("*") == []


async def test_concurrent_revotes_never_double_count(aredis):
    await completion(aredis, "c1")
    votes = [thumb("c1", rating=1 if i % 2 else -1) for i in range(40)]
    await asyncio.gather(*(feedback_store.cast_vote(aredis, v) for v in votes))
    counts = await feedback_store.stats(aredis)
    assert counts.get("thumbs_up", 0) + counts.get("thumbs_down", 0) == 1


async def test_new_since_training(aredis):
    await completion(aredis, "c1")
    await feedback_store.cast_vote(aredis, thumb("c1"))
    await feedback_store.cast_vote(aredis, thumb("c1", voter="key:x"))
    assert (await feedback_store.stats(aredis))["new_since_training"] == 2
    await feedback_store.mark_trained(aredis, 2)
    await feedback_store.cast_vote(aredis, thumb("c1", rating=-1))
    counts = await feedback_store.stats(aredis)
    assert counts["new_since_training"] == 1 and counts["thumbs_up"] == 1 and counts["thumbs_down"] == 1


async def test_all_events_pages_through_the_stream(aredis):
    await completion(aredis, "c1")
    for i in range(5):
        await feedback_store.cast_vote(aredis, thumb("c1", voter=f"v{i}"))
    events = await feedback_store.all_events(aredis, batch=2)
    assert [e.voter for _, e in events] == [f"v{i}" for i in range(5)]
