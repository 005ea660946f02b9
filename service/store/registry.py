"""The adapter registry: every adapter version's weights and metadata in Redis.

A replica on any machine needs nothing but REDIS_URL to serve any version. Versions are immutable
(a name is never reused for other weights). `production` is one pointer, moved atomically together
with the promotion history and a pub/sub message that tells every API replica to swap.

    chatloop:adapter:<v>:weights   adapter_model.safetensors, as bytes
    chatloop:adapter:<v>:meta      JSON: adapter config, parent, reward model, metrics, gate, created_at
    chatloop:adapters              sorted set of versions by creation time
    chatloop:adapter:seq           counter behind new version names (v0001, v0002, ...)
    chatloop:adapter:production    the production version ('base' or unset: no adapter)
    chatloop:adapter:history       list (newest first) of promotions: {version, previous, at, reason}
    chatloop:adapter:events        pub/sub channel: {"event": "promoted", "version": ...}
"""

import json
import time
from pathlib import Path

from redis.asyncio import Redis

from common.models import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, BASE

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


# KEYS: weights, meta, versions; ARGV: weights bytes, meta JSON, created_at, version.
_REGISTER = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
return 1
"""

# KEYS: production, history, meta of the new version; ARGV: version, history entry JSON, channel, message.
_PROMOTE = """
if ARGV[1] ~= 'base' and redis.call('EXISTS', KEYS[3]) == 0 then return {-1, ''} end
local previous = redis.call('GET', KEYS[1]) or 'base'
redis.call('SET', KEYS[1], ARGV[1])
local entry = cjson.decode(ARGV[2])
entry['previous'] = previous
redis.call('LPUSH', KEYS[2], cjson.encode(entry))
redis.call('PUBLISH', ARGV[3], ARGV[4])
return {1, previous}
"""


async def next_version(redis: Redis) -> str:
    return f"v{await redis.incr(SEQ):04d}"


async def register(redis: Redis, version: str, weights: bytes, metadata: dict) -> None:
    """Store a new version; RegistryError if the name is taken (versions are immutable)."""
    if version == BASE or not version:
        raise RegistryError(f"{version!r} cannot name an adapter version")
    created = time.time()
    meta = json.dumps({"version": version, "created_at": created, **metadata})
    keys = [weights_key(version), meta_key(version), VERSIONS]
    if not await redis.eval(_REGISTER, len(keys), *keys, weights, meta, created, version):
        raise RegistryError(f"adapter version {version} already exists")


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
    return [v.decode() if isinstance(v, bytes) else v for v in await redis.zrange(VERSIONS, 0, -1)]


async def production(redis: Redis) -> str:
    raw = await redis.get(PRODUCTION)
    return (raw.decode() if isinstance(raw, bytes) else raw) or BASE


async def promote(redis: Redis, version: str, reason: str = "", rollback: bool = False) -> str:
    """Make `version` production (atomically, with history and a pub/sub message); returns the previous one."""
    entry = json.dumps({"version": version, "at": time.time(), "reason": reason, "rollback": rollback})
    message = json.dumps({"event": "promoted", "version": version})
    keys = [PRODUCTION, HISTORY, meta_key(version)]
    status, previous = await redis.eval(_PROMOTE, len(keys), *keys, version, entry, CHANNEL, message)
    if status == -1:
        raise RegistryError(f"no adapter version {version}")
    return previous.decode() if isinstance(previous, bytes) else previous


async def history(redis: Redis) -> list[dict]:
    return [json.loads(e) for e in await redis.lrange(HISTORY, 0, -1)]


def production_stack(entries: list[dict]) -> list[str]:
    """Production versions in force, oldest first, replaying the history: a promotion pushes, a rollback pops."""
    stack = [BASE]
    for entry in reversed(entries):  # history is newest first
        if entry.get("rollback"):
            if len(stack) > 1:
                stack.pop()
        else:
            stack.append(entry["version"])
    return stack


async def rollback(redis: Redis) -> str:
    """Return to the version that was production before the current one; returns it."""
    stack = production_stack(await history(redis))
    if len(stack) < 2:
        raise RegistryError("nothing to roll back to")
    await promote(redis, stack[-2], reason=f"rollback from {stack[-1]}", rollback=True)
    return stack[-2]


async def export_dir(redis: Redis, raw_redis: Redis, version: str, dest: Path) -> Path:
    """Write a version back out as a peft adapter directory (to train from it or evaluate it)."""
    meta, blob = await metadata(redis, version), await weights(raw_redis, version)
    if meta is None or blob is None:
        raise RegistryError(f"no adapter version {version}")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / ADAPTER_CONFIG_FILE).write_text(json.dumps(meta["adapter_config"]))
    (dest / ADAPTER_WEIGHTS_FILE).write_bytes(blob)
    return dest
