"""Training runs in Redis: the lock that allows one at a time, their records, and files passed between stages.

A run is one pass of the pipeline (reward model -> policy -> evaluate -> promote), each stage its own
Celery task (workers/). Stages may run on different machines, so whatever one stage hands the next (the
feedback file, the reward model) travels through Redis, not the local disk.

    chatloop:pipeline:lock         run id of the run holding the lock; expires unless refreshed
    chatloop:run:<id>              hash: status, stage, progress and results (JSON values)
    chatloop:run:<id>:files:<name> hash: file name -> bytes, one directory handed between stages
    chatloop:runs                  list of run ids, newest first
"""

import json
import time
import uuid
from functools import lru_cache
from pathlib import Path

import redis

from service.settings import Settings

LOCK = "chatloop:pipeline:lock"
RUNS = "chatloop:runs"
ENDED = {"promoted", "rejected", "failed"}  # a verdict
FINISHED = ENDED | {"superseded"}  # nothing more will happen
FILES_TTL_S = 7 * 24 * 3600

_REFRESH = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def run_key(run_id: str) -> str:
    return f"chatloop:run:{run_id}"


def client(settings: Settings, raw: bool = False) -> redis.Redis:
    return _client(settings.redis_url, raw)


@lru_cache
def _client(url: str, raw: bool) -> redis.Redis:
    # One client (and connection pool) per URL: the API reads run records from a thread per request.
    return redis.Redis.from_url(url, decode_responses=not raw)


def get_run(r: redis.Redis, run_id: str) -> dict | None:
    raw = r.hgetall(run_key(run_id))
    return {k: json.loads(v) for k, v in raw.items()} or None


def recent_runs(r: redis.Redis, limit: int = 20) -> list[dict]:
    """The newest runs first."""
    return [run for run_id in r.lrange(RUNS, 0, limit - 1) if (run := get_run(r, run_id))]


def last_finished_run(r: redis.Redis, limit: int = 20) -> dict | None:
    """The newest of the last `limit` runs that ended in a verdict (promoted, rejected or failed)."""
    return next((run for run in recent_runs(r, limit) if run.get("status") in ENDED), None)


def update_run(r: redis.Redis, run_id: str, **fields) -> None:
    r.hset(run_key(run_id), mapping={k: json.dumps(v, default=str) for k, v in fields.items()})


def refresh_lock(r: redis.Redis, run_id: str, ttl_s: int) -> bool:
    return bool(r.eval(_REFRESH, 1, LOCK, run_id, ttl_s))


def release_lock(r: redis.Redis, run_id: str) -> None:
    r.eval(_RELEASE, 1, LOCK, run_id)


def take_lock(r: redis.Redis, settings: Settings, trigger: str) -> str | None:
    """A new run holding the training lock, recorded as queued; None if another run holds the lock."""
    run_id = uuid.uuid4().hex[:12]
    if not r.set(LOCK, run_id, nx=True, ex=settings.pipeline_lock_ttl_s):
        return None
    update_run(r, run_id, id=run_id, status="queued", stage=None, trigger=trigger, created=time.time())
    r.lpush(RUNS, run_id)
    return run_id


def put_dir(settings: Settings, run_id: str, name: str, path: Path) -> None:
    r = client(settings, raw=True)
    key = f"{run_key(run_id)}:files:{name}"
    with r.pipeline(transaction=True) as tx:
        tx.delete(key)
        tx.hset(key, mapping={f.name: f.read_bytes() for f in path.iterdir() if f.is_file()})
        tx.expire(key, FILES_TTL_S)
        tx.execute()


def get_dir(settings: Settings, run_id: str, name: str, dest: Path) -> Path:
    files = client(settings, raw=True).hgetall(f"{run_key(run_id)}:files:{name}")
    if not files:
        raise FileNotFoundError(f"run {run_id} has no {name!r} files")
    dest.mkdir(parents=True, exist_ok=True)
    for file_name, data in files.items():
        (dest / file_name.decode()).write_bytes(data)
    return dest
