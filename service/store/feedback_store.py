"""Feedback events in Redis: one atomic script per vote, appended to a stream that every training run reads.

A vote is keyed by who cast it and what it is about (one answer for a thumb, a set of answers for a
comparison). Casting the same vote again changes nothing; casting a different one replaces it: the
counters move from the old vote to the new one and a new event is appended. Trainers keep the newest
event per vote key, so nothing is ever counted twice.

A run does not consume events: each one trains on its window of the newest votes, read from the stream, and
only a run that finishes moves the "trained" mark (`mark_trained`). A run that crashes moves nothing, so the
next run sees the same events (and any newer ones) again.

Retention: the stream keeps the newest `feedback_max_events` events (a setting well above the training window);
an event that falls out takes its vote hash with it (unless a newer vote replaced it) and any rated completion
no other event in the stream still holds. Nothing about a vote outlives its event.
"""

from collections.abc import Iterable

from redis.asyncio import Redis

from service.feedback.events import FeedbackEvent
from service.settings import get_settings
from service.store import redis_keys

# KEYS: vote, events stream, stats, holds, completion keys...; ARGV: fingerprint, event JSON, counter deltas, max
# events. Checks first, writes after: a script that fails half way would not be rolled back.
#
# Retention: the stream keeps the newest ARGV[4] events. Each entry names its vote hash and the completions it
# holds (rated answers, PERSISTed while any event holds them, counted in the holds hash), so the script trims the
# oldest entries itself rather than with XADD's MAXLEN, which would drop them without saying which: the vote
# hash goes when its current event goes, a completion when the last event holding it goes. Those keys come from
# the entries, not KEYS: fine on one Redis (chatloop's deployments), not on a cluster.
_CAST_VOTE = """
if redis.call('HGET', KEYS[1], 'fingerprint') == ARGV[1] then
  return {0, redis.call('HGET', KEYS[1], 'event_id')}
end
for i = 5, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then return {-1, KEYS[i]} end
end
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
local holds = {}
for i = 5, #KEYS do
  redis.call('PERSIST', KEYS[i])
  redis.call('HINCRBY', KEYS[4], KEYS[i], 1)
  holds[#holds + 1] = KEYS[i]
end
local id = redis.call('XADD', KEYS[2], '*', 'event', ARGV[2], 'vote', KEYS[1], 'holds', table.concat(holds, ' '))
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'counts', ARGV[3], 'event_id', id)
local excess = redis.call('XLEN', KEYS[2]) - tonumber(ARGV[4])
if excess > 0 then
  local trimmed = {}
  for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', math.min(excess, 100))) do
    local fields = {}
    for j = 1, #entry[2], 2 do fields[entry[2][j]] = entry[2][j + 1] end
    if fields['vote'] and redis.call('HGET', fields['vote'], 'event_id') == entry[1] then
      redis.call('DEL', fields['vote'])
    end
    for key in string.gmatch(fields['holds'] or '', '%S+') do
      if redis.call('HINCRBY', KEYS[4], key, -1) <= 0 then
        redis.call('HDEL', KEYS[4], key)
        redis.call('DEL', key)
      end
    end
    trimmed[#trimmed + 1] = entry[1]
  end
  redis.call('XDEL', KEYS[2], unpack(trimmed))
end
return {1 + replaced, id}
"""

RESULTS = {0: "unchanged", 1: "recorded", 2: "replaced"}


class CompletionGone(LookupError):
    """A completion the vote refers to expired or never existed."""


async def cast_vote(redis: Redis, event: FeedbackEvent, max_events: int | None = None) -> tuple[str, str]:
    """Record one vote atomically; returns (recorded|replaced|unchanged, stream event id).

    The stream keeps the newest `max_events` (default: the feedback_max_events setting).
    """
    max_events = max_events or get_settings().feedback_max_events
    completions = sorted({redis_keys.completion(a.completion_id) for a in event.answers})
    keys = [redis_keys.vote(event.vote_key), redis_keys.EVENTS, redis_keys.STATS, redis_keys.HOLDS, *completions]
    counts = " ".join(f"{field}={delta}" for field, delta in event.counts().items() if delta)
    status, event_id = await redis.eval(
        _CAST_VOTE, len(keys), *keys, event.fingerprint(), event.to_json(), counts, max_events
    )
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


async def all_events(redis: Redis, batch: int = 1000, since: float | None = None) -> list[tuple[str, FeedbackEvent]]:
    """Every event in the stream (or every one recorded at or after the Unix time `since`), oldest first."""
    out, start = [], "-" if since is None else f"{int(since * 1000)}-0"
    while True:
        entries = await redis.xrange(redis_keys.EVENTS, min=start, count=batch)
        out += _parse(entries)
        if len(entries) < batch:
            return out
        start = "(" + entries[-1][0]
