"""API keys, stored hashed in Redis (the key itself is shown once and never stored), and the per-minute
request counters behind the rate limits."""

import hashlib
import secrets
import time
from typing import Literal

from redis.asyncio import Redis

from service.store import redis_keys

Role = Literal["user", "admin"]
KEY_PREFIX = "cl-"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def create_key(redis: Redis, role: Role, name: str = "") -> tuple[str, str]:
    """A new API key; returns (key, key id)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    h = digest(key)
    key_id = h[:12]
    async with redis.pipeline(transaction=True) as tx:
        tx.hset(redis_keys.api_key(h), mapping={"id": key_id, "role": role, "name": name, "created": int(time.time())})
        tx.hset(redis_keys.API_KEYS, key_id, h)
        await tx.execute()
    return key, key_id


async def lookup(redis: Redis, key: str) -> dict | None:
    """The record (id, role, name, created) of a key, or None if it is not one of ours."""
    return await redis.hgetall(redis_keys.api_key(digest(key))) or None


async def list_keys(redis: Redis) -> list[dict]:
    hashes = await redis.hgetall(redis_keys.API_KEYS)
    records = [await redis.hgetall(redis_keys.api_key(h)) for h in hashes.values()]
    return sorted((r for r in records if r), key=lambda r: int(r["created"]))


async def revoke_key(redis: Redis, key_id: str) -> bool:
    h = await redis.hget(redis_keys.API_KEYS, key_id)
    if h is None:
        return False
    async with redis.pipeline(transaction=True) as tx:
        tx.delete(redis_keys.api_key(h))
        tx.hdel(redis_keys.API_KEYS, key_id)
        await tx.execute()
    return True


# INCR one counter per fixed one-minute window; the first INCR sets its expiry.
_COUNT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""


async def count_request(redis: Redis, who: str, route: str) -> tuple[int, int]:
    """Count one request of `who` on `route` in the current minute: (requests so far this minute, seconds
    until the next minute starts)."""
    now = time.time()
    window = int(now // 60)
    count = await redis.eval(_COUNT, 1, redis_keys.rate_limit(who, route, window), 61)
    return int(count), max(1, int(60 * (window + 1) - now) + 1)
