"""Training runs: the lock that allows one at a time, their records, and files passed between stages.

A run is one pass of the pipeline (reward model -> PPO -> evaluate -> promote), each stage its own
Celery task. Stages may run on different machines, so whatever one stage hands the next (the feedback
file, the reward model) travels through Redis, not the local disk.

    chatloop:pipeline:lock         run id of the run holding the lock; expires unless refreshed
    chatloop:run:<id>              hash: status, stage, progress and results (JSON values)
    chatloop:run:<id>:files:<name> hash: file name -> bytes, one directory handed between stages
    chatloop:runs                  list of run ids, newest first
"""

import asyncio
import json
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis
from celery import Celery, chain
from celery.exceptions import Ignore
from redis.asyncio import Redis as AsyncRedis

from service.settings import Settings

LOCK = "chatloop:pipeline:lock"
RUNS = "chatloop:runs"
STAGES = ("chatloop.train_reward", "chatloop.train_policy", "chatloop.evaluate", "chatloop.promote")
FINISHED = {"promoted", "rejected", "failed", "superseded"}
FILES_TTL_S = 7 * 24 * 3600

_REFRESH = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def run_key(run_id: str) -> str:
    return f"chatloop:run:{run_id}"


def client(settings: Settings, raw: bool = False) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, decode_responses=not raw)


def arun(settings: Settings, fn: Callable, *args, raw: bool = False):
    """Call one of the service's async Redis functions from a (synchronous) Celery task."""

    async def call():
        clients = [AsyncRedis.from_url(settings.redis_url, decode_responses=True)]
        if raw:
            clients.append(AsyncRedis.from_url(settings.redis_url))
        try:
            return await fn(*clients, *args)
        finally:
            for c in clients:
                await c.aclose()

    return asyncio.run(call())


def get_run(r: redis.Redis, run_id: str) -> dict | None:
    raw = r.hgetall(run_key(run_id))
    return {k: json.loads(v) for k, v in raw.items()} or None


def recent_runs(r: redis.Redis, limit: int = 20) -> list[dict]:
    """The newest runs first."""
    return [run for run_id in r.lrange(RUNS, 0, limit - 1) if (run := get_run(r, run_id))]


def update_run(r: redis.Redis, run_id: str, **fields) -> None:
    r.hset(run_key(run_id), mapping={k: json.dumps(v, default=str) for k, v in fields.items()})


def refresh_lock(r: redis.Redis, run_id: str, ttl_s: int) -> bool:
    return bool(r.eval(_REFRESH, 1, LOCK, run_id, ttl_s))


def release_lock(r: redis.Redis, run_id: str) -> None:
    r.eval(_RELEASE, 1, LOCK, run_id)


def start_pipeline(app: Celery, settings: Settings, trigger: str) -> str | None:
    """Take the lock and queue the stages; None if a run already holds the lock."""
    r = client(settings)
    run_id = uuid.uuid4().hex[:12]
    if not r.set(LOCK, run_id, nx=True, ex=settings.pipeline_lock_ttl_s):
        return None
    update_run(r, run_id, id=run_id, status="queued", stage=None, trigger=trigger, created=time.time())
    r.lpush(RUNS, run_id)
    chain(*(app.signature(name, args=(run_id,), immutable=True) for name in STAGES)).apply_async()
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


@dataclass
class Stage:
    run_id: str
    run: dict
    work: Path  # a scratch directory, removed when the stage ends
    redis: redis.Redis
    progress: Callable[[str, int, int, dict], None]

    def update(self, **fields) -> None:
        update_run(self.redis, self.run_id, **fields)
        self.run.update(fields)


@contextmanager
def stage(task, settings: Settings, run_id: str, name: str) -> Iterator[Stage]:
    """Run one stage of a run: it must still hold the lock; failures end the run and free the lock.

    A run that is over (or lost its lock to a newer run) stops the chain with Ignore.
    """
    r = client(settings)
    run = get_run(r, run_id)
    if run is None or run.get("status") in FINISHED:
        raise Ignore()
    if not refresh_lock(r, run_id, settings.pipeline_lock_ttl_s):
        update_run(r, run_id, status="superseded", error="lost the training lock (it expired)")
        raise Ignore()

    def progress(stage_name: str, step: int, total: int, metrics: dict) -> None:
        refresh_lock(r, run_id, settings.pipeline_lock_ttl_s)
        meta = {"run_id": run_id, "stage": stage_name, "step": step, "total": total, "metrics": metrics}
        task.update_state(state="PROGRESS", meta=meta)
        update_run(r, run_id, progress=meta)

    update_run(r, run_id, status="running", stage=name, task_id=task.request.id)
    if settings.train_threads:
        import torch

        torch.set_num_threads(settings.train_threads)
    root = settings.data_dir / "work"
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{run_id}-{name}-", dir=root))
    # The lock lives while this stage does: a heartbeat refreshes it, so only a dead worker lets it lapse.
    stop = threading.Event()
    heartbeat = threading.Thread(
        target=_heartbeat, args=(settings, run_id, stop), name=f"lock-heartbeat-{run_id}", daemon=True
    )
    heartbeat.start()
    try:
        yield Stage(run_id, run, work, r, progress)
    except Ignore:
        raise
    except Exception as exc:
        update_run(r, run_id, status="failed", error=f"{name}: {type(exc).__name__}: {exc}")
        release_lock(r, run_id)
        raise
    finally:
        stop.set()
        heartbeat.join()
        shutil.rmtree(work, ignore_errors=True)


def _heartbeat(settings: Settings, run_id: str, stop: threading.Event) -> None:
    r = client(settings)
    while not stop.wait(settings.pipeline_lock_ttl_s / 3):
        refresh_lock(r, run_id, settings.pipeline_lock_ttl_s)
