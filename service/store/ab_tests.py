"""The online A/B test in progress (service/feedback/ab.py): at most one, so every replica reads the same.

    chatloop:ab:active   JSON of the running ABTest; absent when none runs
    chatloop:ab:waiting  JSON of the candidate waiting for the running test to end (a Waiting): at most one, the
                         newest; absent when none waits
"""

import json
from typing import NamedTuple

from redis.asyncio import Redis

from service.feedback.ab import ABTest

ACTIVE = "chatloop:ab:active"
WAITING = "chatloop:ab:waiting"


class Waiting(NamedTuple):
    """A candidate that passed the offline checks while a test it may not interrupt ran."""

    candidate: str
    parent: str  # the version it was trained from
    run_id: str

# KEYS: active; ARGV: candidate. Delete only the test of this candidate: a newer test is never ended by mistake.
_FINISH = """
local raw = redis.call('GET', KEYS[1])
if raw and cjson.decode(raw)['candidate'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# KEYS: waiting; ARGV: candidate. Clear the slot only if this candidate still holds it.
_CLEAR_WAITING = """
local raw = redis.call('GET', KEYS[1])
if raw and cjson.decode(raw)[1] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# KEYS: active; ARGV: the candidate expected to be under test, the new test's JSON. Replace only that test.
_REPLACE = """
local raw = redis.call('GET', KEYS[1])
if raw and cjson.decode(raw)['candidate'] == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2]) return 1 end
return 0
"""


async def start(redis: Redis, test: ABTest) -> bool:
    """Start a test unless one runs already; True if this one started."""
    return bool(await redis.set(ACTIVE, json.dumps(test.to_dict()), nx=True))


async def active(redis: Redis) -> ABTest | None:
    raw = await redis.get(ACTIVE)
    return ABTest.from_dict(json.loads(raw)) if raw else None


async def replace(redis: Redis, candidate: str, test: ABTest) -> bool:
    """Put `test` in place of the running test of `candidate`; False if that is not the one running."""
    return bool(await redis.eval(_REPLACE, 1, ACTIVE, candidate, json.dumps(test.to_dict())))


async def finish(redis: Redis, candidate: str) -> bool:
    """End the test of this candidate; False if it is not the one running."""
    return bool(await redis.eval(_FINISH, 1, ACTIVE, candidate))


async def wait(redis: Redis, entry: Waiting) -> Waiting | None:
    """Make `entry` the candidate waiting for its turn; returns the one it displaced (None if none, or the same)."""
    raw = await redis.set(WAITING, json.dumps(list(entry)), get=True)
    displaced = Waiting(*json.loads(raw)) if raw else None
    return None if displaced == entry else displaced


async def waiting(redis: Redis) -> Waiting | None:
    raw = await redis.get(WAITING)
    return Waiting(*json.loads(raw)) if raw else None


async def clear_waiting(redis: Redis, candidate: str) -> bool:
    """Empty the waiting slot if `candidate` holds it; False if another (or none) does."""
    return bool(await redis.eval(_CLEAR_WAITING, 1, WAITING, candidate))
