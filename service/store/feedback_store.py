"""Feedback events in Redis: one atomic script per vote, appended to a stream that every training run reads.

A vote is keyed by who cast it and what it is about (one answer for a thumb, a set of answers for a
comparison). Casting the same vote again changes nothing; casting a different one replaces it: the
counters move from the old vote to the new one and a new event is appended. Trainers keep the newest
event per vote key, so nothing is ever counted twice.

A run does not consume events: each one trains on its window of the newest votes, read from the stream, and
only a run that finishes moves the "trained" mark (`mark_trained`). A run that crashes moves nothing, so the
next run sees the same events (and any newer ones) again.
"""

from collections.abc import Iterable

from redis.asyncio import Redis

from service.feedback.events import FeedbackEvent
from service.store import redis_keys

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


def _parse(entries: Iterable) -> list[tuple[str, FeedbackEvent]]:
    return [(entry_id, FeedbackEvent.from_json(fields["event"])) for entry_id, fields in entries if fields]


async def all_events(redis: Redis, batch: int = 1000) -> list[tuple[str, FeedbackEvent]]:
    """Every event in the stream, oldest first."""
    out, start = [], "-"
    while True:
        entries = await redis.xrange(redis_keys.EVENTS, min=start, count=batch)
        out += _parse(entries)
        if len(entries) < batch:
            return out
        start = "(" + entries[-1][0]
