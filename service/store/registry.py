"""The adapter registry: every adapter version's weights and metadata in Redis.

A replica on any machine needs nothing but REDIS_URL to serve any version. Versions are immutable
(a name is never reused for other weights) and carry the sha256 of their weights, so that a cache can tell
when a name came back with other weights (a Redis without persistence restarts its counter). `production` is
one pointer, moved by one script together with the promotion history and a pub/sub message that tells every
API replica to swap; promotion and rollback check the production they expect (compare-and-set).

    chatloop:adapter:<v>:weights   adapter_model.safetensors, as bytes
    chatloop:adapter:<v>:meta      JSON: adapter config, sha256, parent, reward model, metrics, gate, created_at
    chatloop:adapters              sorted set of versions by creation time
    chatloop:adapter:seq           counter behind new version names (v0001, v0002, ...)
    chatloop:adapter:production    the production version ('base' or unset: no adapter)
    chatloop:adapter:history       list (newest first) of promotions: {version, previous, at, reason, rollback}
    chatloop:adapter:events        pub/sub channel: {"event": "promoted" | "candidate", "version": ...}

Retention: production, every version the history names and the candidates of the running A/B test and of the one
waiting for its turn are kept;
of the other (never promoted) versions, the newest `keep_candidates`; registering a version deletes the rest.
"""

import hashlib
import json
import time
from pathlib import Path

from redis.asyncio import Redis

from common.models import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, BASE
from service.settings import get_settings
from service.store import ab_tests

PREFIX = "chatloop:adapter"
VERSIONS = "chatloop:adapters"
SEQ = f"{PREFIX}:seq"
PRODUCTION = f"{PREFIX}:production"
HISTORY = f"{PREFIX}:history"
CHANNEL = f"{PREFIX}:events"


def weights_key(version: str) -> str:
    return f"{PREFIX}:{version}:weights"


def meta_key(version: str) -> str:
    return f"{PREFIX}:{version}:meta"


class RegistryError(ValueError):
    pass


class UnknownVersion(RegistryError):
    pass


class PromotionConflict(RegistryError):
    """Production is not what the caller expected; nothing changed."""

    def __init__(self, message: str, current: str) -> None:
        super().__init__(message)
        self.current = current


class AlreadyProduction(PromotionConflict):
    """The version is production already: promoting it again would be a no-op, so nothing changed."""


class NothingToRollBack(RegistryError):
    pass


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


# KEYS: weights, meta, versions; ARGV: weights bytes, meta JSON, created_at, version.
_REGISTER = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
return 1
"""

# KEYS: production, history, versions, A/B test, waiting candidate; ARGV: never-promoted versions to keep, key prefix.
# The weights and meta keys of the versions it deletes are built here from the prefix (one Redis, no cluster).
_COLLECT = """
local protected = {}
protected[redis.call('GET', KEYS[1]) or 'base'] = true
for _, raw in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  local entry = cjson.decode(raw)
  protected[entry['version'] or ''] = true
  protected[entry['previous'] or ''] = true
end
local test = redis.call('GET', KEYS[4])
if test then protected[cjson.decode(test)['candidate'] or ''] = true end
local waiting = redis.call('GET', KEYS[5])
if waiting then protected[cjson.decode(waiting)[1] or ''] = true end
local kept, deleted = 0, {}
for _, version in ipairs(redis.call('ZREVRANGE', KEYS[3], 0, -1)) do
  if not protected[version] then
    if kept < tonumber(ARGV[1]) then
      kept = kept + 1
    else
      redis.call('DEL', ARGV[2] .. ':' .. version .. ':weights', ARGV[2] .. ':' .. version .. ':meta')
      redis.call('ZREM', KEYS[3], version)
      deleted[#deleted + 1] = version
    end
  end
end
return deleted
"""

# KEYS: production, history, meta of the new version; ARGV: version, history entry JSON, channel, message,
# expected production ('' = any). Status: 1 done, -1 unknown version, -2 already production, -3 not expected.
_PROMOTE = """
if ARGV[1] ~= 'base' and redis.call('EXISTS', KEYS[3]) == 0 then return {-1, ''} end
local current = redis.call('GET', KEYS[1]) or 'base'
if current == ARGV[1] then return {-2, current} end
if ARGV[5] ~= '' and current ~= ARGV[5] then return {-3, current} end
redis.call('SET', KEYS[1], ARGV[1])
local entry = cjson.decode(ARGV[2])
entry['previous'] = current
redis.call('LPUSH', KEYS[2], cjson.encode(entry))
redis.call('PUBLISH', ARGV[3], ARGV[4])
return {1, current}
"""

# KEYS: production, history; ARGV: expected production ('' = any), time, channel.
# Replays the history (oldest first) into the stack of versions in force: a promotion pushes (unless its version
# is already on top: histories written before no-op promotions were refused), a rollback pops.
# Status: 1 done (with the version now in production), -3 not expected, -4 nothing to roll back to.
_ROLLBACK = """
local current = redis.call('GET', KEYS[1]) or 'base'
if ARGV[1] ~= '' and current ~= ARGV[1] then return {-3, current} end
local entries = redis.call('LRANGE', KEYS[2], 0, -1)
local stack = {'base'}
for i = #entries, 1, -1 do
  local entry = cjson.decode(entries[i])
  if entry['rollback'] then
    if #stack > 1 then table.remove(stack) end
  elseif stack[#stack] ~= entry['version'] then
    stack[#stack + 1] = entry['version']
  end
end
if #stack < 2 then return {-4, current} end
local target = stack[#stack - 1]
redis.call('SET', KEYS[1], target)
local entry = {version = target, previous = current, at = tonumber(ARGV[2]), reason = 'rollback from ' .. current,
               rollback = true}
redis.call('LPUSH', KEYS[2], cjson.encode(entry))
redis.call('PUBLISH', ARGV[3], cjson.encode({event = 'promoted', version = target}))
return {1, target}
"""


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def next_version(redis: Redis) -> str:
    return f"v{await redis.incr(SEQ):04d}"


async def register(
    redis: Redis, version: str, weights: bytes, metadata: dict, keep_candidates: int | None = None
) -> None:
    """Store a new version (with its weights' sha256), then delete never-promoted versions past the newest
    `keep_candidates` (default: the setting); RegistryError if the name is taken (versions are immutable)."""
    if version == BASE or not version:
        raise RegistryError(f"{version!r} cannot name an adapter version")
    created = time.time()
    meta = json.dumps({"version": version, "created_at": created, **metadata, "sha256": sha256(weights)})
    keys = [weights_key(version), meta_key(version), VERSIONS]
    if not await redis.eval(_REGISTER, len(keys), *keys, weights, meta, created, version):
        raise RegistryError(f"adapter version {version} already exists")
    await collect_garbage(redis, keep_candidates or get_settings().keep_candidates)


async def collect_garbage(redis: Redis, keep_candidates: int) -> list[str]:
    """Delete the never-promoted versions past the newest `keep_candidates`; returns the versions deleted."""
    keys = [PRODUCTION, HISTORY, VERSIONS, ab_tests.ACTIVE, ab_tests.WAITING]
    return [_text(v) for v in await redis.eval(_COLLECT, len(keys), *keys, keep_candidates, PREFIX)]


async def register_dir(redis: Redis, path: Path, metadata: dict | None = None, version: str | None = None) -> str:
    """Store a peft adapter directory as a new version (named v000N unless given)."""
    config = json.loads((path / ADAPTER_CONFIG_FILE).read_text())
    version = version or await next_version(redis)
    weights = (path / ADAPTER_WEIGHTS_FILE).read_bytes()
    await register(redis, version, weights, {"adapter_config": config, **(metadata or {})})
    return version


async def metadata(redis: Redis, version: str) -> dict | None:
    raw = await redis.get(meta_key(version))
    return json.loads(raw) if raw else None


async def weights(raw_redis: Redis, version: str) -> bytes | None:
    """The safetensors bytes; needs a client made with decode_responses=False."""
    return await raw_redis.get(weights_key(version))


async def versions(redis: Redis) -> list[str]:
    return [_text(v) for v in await redis.zrange(VERSIONS, 0, -1)]


async def production(redis: Redis) -> str:
    raw = await redis.get(PRODUCTION)
    return _text(raw) if raw else BASE


async def promote(redis: Redis, version: str, reason: str = "", expected: str | None = None) -> str:
    """Make `version` production (one script: pointer, history, pub/sub message); returns the previous one.

    expected: the production the caller saw (the one a training run started from); if production is something
    else by now, PromotionConflict and nothing changes. Promoting the production version again is refused
    (AlreadyProduction) and leaves the history alone, so that a rollback still goes back a real step.
    """
    entry = json.dumps({"version": version, "at": time.time(), "reason": reason, "rollback": False})
    message = json.dumps({"event": "promoted", "version": version})
    keys = [PRODUCTION, HISTORY, meta_key(version)]
    status, current = await redis.eval(_PROMOTE, len(keys), *keys, version, entry, CHANNEL, message, expected or "")
    current = _text(current)
    if status == -1:
        raise UnknownVersion(f"no adapter version {version}")
    if status == -2:
        raise AlreadyProduction(f"{version} is production already", current)
    if status == -3:
        raise PromotionConflict(f"production is {current}, not {expected}", current)
    return current


async def announce(redis: Redis, version: str) -> None:
    """Tell every replica to load `version` before it is promoted (the candidate of an A/B test), so that its
    promotion is a pointer flip on replicas that have it merged already."""
    await redis.publish(CHANNEL, json.dumps({"event": "candidate", "version": version}))


async def rollback(redis: Redis, expected: str | None = None) -> str:
    """Return to the version that was production before the current one (one script); returns it.

    expected: the production the caller saw; if it changed meanwhile, PromotionConflict and nothing changes.
    """
    keys = [PRODUCTION, HISTORY]
    status, version = await redis.eval(_ROLLBACK, len(keys), *keys, expected or "", time.time(), CHANNEL)
    version = _text(version)
    if status == -3:
        raise PromotionConflict(f"production is {version}, not {expected}", version)
    if status == -4:
        raise NothingToRollBack("nothing to roll back to")
    return version


async def history(redis: Redis) -> list[dict]:
    return [json.loads(e) for e in await redis.lrange(HISTORY, 0, -1)]


async def promoted_since(redis: Redis, parent: str, production: str) -> bool:
    """Whether `production` was reached from `parent` by promotions alone: the newest history entries, down to the
    one that replaced `parent`, include no rollback (False if `parent` was never replaced)."""
    if production == parent:
        return True
    for entry in await history(redis):
        if entry.get("rollback"):
            return False
        if entry.get("previous") == parent:
            return True
    return False


async def export_dir(redis: Redis, raw_redis: Redis, version: str, dest: Path) -> Path:
    """Write a version back out as a peft adapter directory (to train from it or evaluate it)."""
    meta, blob = await metadata(redis, version), await weights(raw_redis, version)
    if meta is None or blob is None:
        raise RegistryError(f"no adapter version {version}")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / ADAPTER_CONFIG_FILE).write_text(json.dumps(meta["adapter_config"]))
    (dest / ADAPTER_WEIGHTS_FILE).write_bytes(blob)
    return dest
