"""Training runs in Redis: the lock that allows one at a time, their records, and files passed between stages.

A run is one pass of the pipeline (reward model -> policy -> evaluate -> promote), each stage its own
Celery task (workers/). Stages may run on different machines, so whatever one stage hands the next (the
feedback file, the reward model) travels through Redis, not the local disk.

    chatloop:pipeline:lock         run id of the run holding the lock; expires unless refreshed
    chatloop:run:<id>              hash: status, stage, progress and results (JSON values)
    chatloop:run:<id>:files:<name> hash: file name -> bytes, one directory handed between stages
    chatloop:run:<id>:dirs         set of the <name>s above
    chatloop:runs                  list of run ids, newest first

Retention: when a run starts, the newest `keep_runs` records stay and older runs are deleted with their files;
when a run ends, the files of every finished run go too, but for its reward model (a linear head, a few tens of
KB: what a benchmark or an operator inspects afterwards). Any file expires after FILES_TTL_S.
"""

import json
import re
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


def dirs_key(run_id: str) -> str:
    return f"{run_key(run_id)}:dirs"


def files_key(run_id: str, name: str) -> str:
    return f"{run_key(run_id)}:files:{name}"


class UnsafeFileName(ValueError):
    """A run's files name a path, not a plain file name: written out, it could land anywhere."""


# A plain file name: no separators, not "." or "..", so never a path out of the destination directory.
_SAFE_NAME = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9._-]{1,255}")


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
    """Free the lock of a run that ended, and the files it no longer needs."""
    r.eval(_RELEASE, 1, LOCK, run_id)
    prune_runs(r)


def take_lock(r: redis.Redis, settings: Settings, trigger: str) -> str | None:
    """A new run holding the training lock, recorded as queued; None if another run holds the lock."""
    run_id = uuid.uuid4().hex[:12]
    if not r.set(LOCK, run_id, nx=True, ex=settings.pipeline_lock_ttl_s):
        return None
    update_run(r, run_id, id=run_id, status="queued", stage=None, trigger=trigger, created=time.time())
    r.lpush(RUNS, run_id)
    prune_runs(r, settings.keep_runs)
    return run_id


KEPT_DIRS = {"reward"}  # what a finished run keeps until its record goes


def prune_runs(r: redis.Redis, keep: int | None = None) -> None:
    """Apply the retention rule (module docstring): records past the newest `keep` (None: none) go with all their
    files; finished runs keep only their reward model."""
    for index, run_id in enumerate(r.lrange(RUNS, 0, -1)):
        run = get_run(r, run_id) or {}
        expired = keep is not None and index >= keep  # that many runs later it is over, whatever its record says
        if not expired and run.get("status") not in FINISHED:
            continue  # queued, running or under test: its files are in use
        names = set(r.smembers(dirs_key(run_id)))
        dropped = names if expired else names - KEPT_DIRS
        if not dropped and not expired:
            continue
        with r.pipeline(transaction=True) as tx:
            if dropped:
                tx.delete(*(files_key(run_id, name) for name in dropped))
                tx.srem(dirs_key(run_id), *dropped)
            if expired:
                tx.delete(run_key(run_id), dirs_key(run_id))
                tx.lrem(RUNS, 0, run_id)
            tx.execute()


def put_dir(settings: Settings, run_id: str, name: str, path: Path) -> None:
    r = client(settings, raw=True)
    key = files_key(run_id, name)
    with r.pipeline(transaction=True) as tx:
        tx.delete(key)
        tx.hset(key, mapping={f.name: f.read_bytes() for f in path.iterdir() if f.is_file()})
        tx.expire(key, FILES_TTL_S)
        tx.sadd(dirs_key(run_id), name)
        tx.expire(dirs_key(run_id), FILES_TTL_S)
        tx.execute()


def get_dir(settings: Settings, run_id: str, name: str, dest: Path) -> Path:
    """Write a directory put_dir stored into dest; UnsafeFileName (and nothing written) if a name in Redis is a
    path rather than a plain file name (whoever can write to Redis must not place files elsewhere)."""
    files = {file_name.decode(errors="replace"): data
             for file_name, data in client(settings, raw=True).hgetall(files_key(run_id, name)).items()}
    if not files:
        raise FileNotFoundError(f"run {run_id} has no {name!r} files")
    if unsafe := sorted(f for f in files if not _SAFE_NAME.fullmatch(f)):
        raise UnsafeFileName(f"run {run_id}'s {name!r} files include names that are not plain file names: {unsafe}")
    dest.mkdir(parents=True, exist_ok=True)
    for file_name, data in files.items():
        (dest / file_name).write_bytes(data)
    return dest
