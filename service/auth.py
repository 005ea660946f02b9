"""API keys (stored hashed in Redis), roles, anonymous access and per-caller rate limits."""

import hashlib
import ipaddress
import secrets
import time
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis

from service import redis_keys
from service.errors import APIError

Role = Literal["user", "admin"]
KEY_PREFIX = "cl-"


@dataclass(frozen=True)
class Caller:
    key_id: str | None  # None: anonymous
    role: Literal["user", "admin", "anonymous"]
    address: str

    @property
    def principal(self) -> str:
        """Who owns what this caller creates: 'key:<id>' or 'anonymous'."""
        return f"key:{self.key_id}" if self.key_id else "anonymous"

    @property
    def limiter_id(self) -> str:
        return self.principal if self.key_id else f"addr:{self.address}"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def create_key(redis: Redis, role: Role, name: str = "") -> tuple[str, str]:
    """A new API key; returns (key, key id). The key itself is shown once and never stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    h = digest(key)
    key_id = h[:12]
    async with redis.pipeline(transaction=True) as tx:
        tx.hset(redis_keys.api_key(h), mapping={"id": key_id, "role": role, "name": name, "created": int(time.time())})
        tx.hset(redis_keys.API_KEYS, key_id, h)
        await tx.execute()
    return key, key_id


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


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


async def identify(
    redis: Redis, authorization: str | None, address: str, anonymous: Literal["loopback", "always", "never"]
) -> Caller:
    """The caller behind a request: a valid key, or anonymous where the setting allows it (else 401).

    OpenAI clients insist on sending some key; a token that is not a chatloop key (they start with
    'cl-'), such as 'EMPTY' or 'unused', counts as no key at all.
    """
    scheme, _, key = (authorization or "").partition(" ")
    key = key.strip()
    if authorization and (scheme.lower() != "bearer" or not key):
        raise APIError(401, "Authorization must be 'Bearer <API key>'", code="invalid_api_key")
    if key.startswith(KEY_PREFIX):
        record = await redis.hgetall(redis_keys.api_key(digest(key)))
        if not record:
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")
        return Caller(key_id=record["id"], role=record["role"], address=address)
    if anonymous == "always" or (anonymous == "loopback" and is_loopback(address)):
        return Caller(key_id=None, role="anonymous", address=address)
    raise APIError(401, "An API key is required (Authorization: Bearer <key>)", code="missing_api_key")


def require_admin(caller: Caller) -> Caller:
    if caller.role != "admin":
        raise APIError(403, "This route needs an admin API key", code="admin_required")
    return caller


# INCR one counter per fixed one-minute window; the first INCR sets its expiry.
_LIMIT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""


async def enforce_rate_limit(redis: Redis, caller: Caller, route: str, per_minute: int) -> None:
    if per_minute <= 0:
        return
    now = time.time()
    window = int(now // 60)
    count = await redis.eval(_LIMIT, 1, redis_keys.rate_limit(caller.limiter_id, route, window), 61)
    if count > per_minute:
        retry_after = max(1, int(60 * (window + 1) - now) + 1)
        raise APIError(
            429, f"Rate limit of {per_minute} {route} requests per minute reached; retry in {retry_after} s",
            code="rate_limit_exceeded", headers={"Retry-After": str(retry_after)},
        )
