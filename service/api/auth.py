"""Who is calling: an API key, or anonymous where the settings allow it; roles and per-caller rate limits."""

import ipaddress
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis

from service.errors import APIError
from service.store import api_keys


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


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


async def identify(
    redis: Redis, authorization: str | None, address: str, anonymous: Literal["loopback", "always", "never"],
    direct: bool,
) -> Caller:
    """The caller behind a request: a valid key, or anonymous where the setting allows it (else 401).

    OpenAI clients insist on sending some key; a token that is not a chatloop key (they start with
    'cl-'), such as 'EMPTY' or 'unused', counts as no key at all. `loopback` lets a caller in without a
    key only when its address is loopback and the request came `direct` (no proxy, a loopback Host:
    service/api/hosts.py): behind a proxy on this host every client's address is loopback.
    """
    scheme, _, key = (authorization or "").partition(" ")
    key = key.strip()
    if authorization and (scheme.lower() != "bearer" or not key):
        raise APIError(401, "Authorization must be 'Bearer <API key>'", code="invalid_api_key")
    if key.startswith(api_keys.KEY_PREFIX):
        record = await api_keys.lookup(redis, key)
        if not record:
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")
        return Caller(key_id=record["id"], role=record["role"], address=address)
    if anonymous == "always" or (anonymous == "loopback" and direct and is_loopback(address)):
        return Caller(key_id=None, role="anonymous", address=address)
    raise APIError(401, "An API key is required (Authorization: Bearer <key>)", code="missing_api_key")


def refuse_admin_from_widget(caller: Caller, origin: str | None, widget_origins: frozenset[str]) -> None:
    """A page embedding the feedback widget shows its key to every visitor: an admin key sent from one of those
    origins (the browser sets Origin, and a page cannot) is refused, so that mistake cannot stay unnoticed."""
    if caller.role == "admin" and origin and origin.rstrip("/").lower() in widget_origins:
        raise APIError(403, f"An admin key may not be used from a widget page ({origin}): give the widget a "
                       "user-role key", code="admin_key_from_widget")


def require_admin(caller: Caller) -> Caller:
    if caller.role != "admin":
        raise APIError(403, "This route needs an admin API key", code="admin_required")
    return caller


async def enforce_rate_limit(redis: Redis, caller: Caller, route: str, per_minute: int) -> None:
    if per_minute <= 0:
        return
    count, retry_after = await api_keys.count_request(redis, caller.limiter_id, route)
    if count > per_minute:
        raise APIError(
            429, f"Rate limit of {per_minute} {route} requests per minute reached; retry in {retry_after} s",
            code="rate_limit_exceeded", headers={"Retry-After": str(retry_after)},
        )
