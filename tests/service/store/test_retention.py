"""Retention of the feedback families: the stream keeps its newest events, and a vote hash or a rated completion
lives exactly as long as an event in the stream holds it."""

from service.feedback.events import AnswerRef, FeedbackEvent
from service.store import feedback_store, redis_keys

PROMPT = [{"role": "user", "content": "q"}]


async def completion(redis, completion_id: str) -> None:
    await redis.set(redis_keys.completion(completion_id), "{}", ex=600)


def thumb(completion_id: str, voter: str, rating: int = 1) -> FeedbackEvent:
    return FeedbackEvent(kind="thumb", created=1, voter=voter, prompt=PROMPT, conversation="c",
                         answers=[AnswerRef(completion_id=completion_id, text="a")], rating=rating)


def comparison(ids: list[str], voter: str) -> FeedbackEvent:
    return FeedbackEvent(kind="comparison", created=1, voter=voter, prompt=PROMPT, conversation="c",
                         answers=[AnswerRef(completion_id=i, text=i) for i in ids], preferred=0)


async def live(redis) -> tuple[set[str], set[str]]:
    """(completion ids, vote keys) present in Redis."""
    completions = {k.rsplit(":", 1)[1] async for k in redis.scan_iter(redis_keys.completion("*"))}
    votes = {k async for k in redis.scan_iter(redis_keys.vote("*"))}
    return completions, votes


async def test_the_stream_keeps_its_newest_events_and_nothing_they_no_longer_hold(aredis):
    for i in range(8):
        await completion(aredis, f"c{i}")
        await feedback_store.cast_vote(aredis, thumb(f"c{i}", "key:a"), max_events=3)
    events = await feedback_store.all_events(aredis)
    assert [e.answers[0].completion_id for _, e in events] == ["c5", "c6", "c7"]
    completions, votes = await live(aredis)
    assert completions == {"c5", "c6", "c7"}
    assert votes == {redis_keys.vote(thumb(f"c{i}", "key:a").vote_key) for i in (5, 6, 7)}
    assert await aredis.hgetall(redis_keys.HOLDS) == {redis_keys.completion(f"c{i}"): "1" for i in (5, 6, 7)}
    assert [await aredis.ttl(redis_keys.completion(f"c{i}")) for i in (5, 6, 7)] == [-1, -1, -1]
    assert (await feedback_store.stats(aredis))["thumbs_up"] == 8  # the counters count every vote ever cast


async def test_what_a_newer_event_holds_outlives_an_older_one(aredis):
    for cid in ("shared", "other", "x"):
        await completion(aredis, cid)
    await feedback_store.cast_vote(aredis, thumb("shared", "key:a"), max_events=3)  # 1: replaced by 3
    await feedback_store.cast_vote(aredis, comparison(["shared", "other"], "key:b"), max_events=3)  # 2
    await feedback_store.cast_vote(aredis, thumb("shared", "key:a", rating=-1), max_events=3)  # 3
    await feedback_store.cast_vote(aredis, thumb("x", "key:a"), max_events=3)  # 4: event 1 leaves
    completions, votes = await live(aredis)
    assert completions == {"shared", "other", "x"} and len(votes) == 3  # key:a's thumb is its newer vote now
    assert await aredis.hget(redis_keys.HOLDS, redis_keys.completion("shared")) == "2"
    await completion(aredis, "y")
    await feedback_store.cast_vote(aredis, thumb("y", "key:a"), max_events=3)  # event 2 leaves: "other" goes
    completions, votes = await live(aredis)
    assert completions == {"shared", "x", "y"} and len(votes) == 3
    await feedback_store.cast_vote(aredis, thumb("x", "key:c"), max_events=3)  # event 3 leaves: "shared" goes
    completions, votes = await live(aredis)
    assert completions == {"x", "y"} and len(votes) == 3
    assert await aredis.hgetall(redis_keys.HOLDS) == {redis_keys.completion("x"): "2",
                                                      redis_keys.completion("y"): "1"}


async def test_an_unchanged_vote_holds_nothing_more(aredis):
    await completion(aredis, "c1")
    for _ in range(3):
        await feedback_store.cast_vote(aredis, thumb("c1", "key:a"), max_events=2)
    assert await aredis.xlen(redis_keys.EVENTS) == 1
    assert await aredis.hget(redis_keys.HOLDS, redis_keys.completion("c1")) == "1"


async def test_events_since_a_time(aredis):
    await completion(aredis, "c1")
    await feedback_store.cast_vote(aredis, thumb("c1", "key:a"))
    (first_id, _), = await feedback_store.all_events(aredis)
    first_ms = int(first_id.split("-")[0])
    await aredis.xadd(redis_keys.EVENTS, {"event": thumb("c1", "key:b").to_json()}, id=f"{first_ms + 5000}-0")
    assert [e.voter for _, e in await feedback_store.all_events(aredis, since=(first_ms + 1) / 1000)] == ["key:b"]
    assert len(await feedback_store.all_events(aredis, since=first_ms / 1000)) == 2
