"""A training run as a chain of Celery tasks: starting one, and the frame every stage runs in (the lock
held by a heartbeat, progress reported, a scratch directory, failures recorded). The run's records, lock
and files live in Redis (service/store/runs.py).
"""

import asyncio
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis
from celery import Celery, chain
from celery.exceptions import Ignore
from redis.asyncio import Redis as AsyncRedis

from service.settings import Settings
from service.store.runs import (
    FINISHED,
    LOCK,
    client,
    get_run,
    recent_runs,
    refresh_lock,
    release_lock,
    run_key,
    take_lock,
    update_run,
)

STAGES = ("chatloop.train_reward", "chatloop.train_policy", "chatloop.evaluate", "chatloop.promote")


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


def mark_lost_runs(r: redis.Redis) -> list[str]:
    """Runs recorded as queued or running that no longer hold the lock: their worker stopped without recording an
    end (a hard time limit kills the child; no stage is redelivered after that). Marked failed; their ids."""
    holder = r.get(LOCK)
    lost = [run["id"] for run in recent_runs(r) if run.get("status") in ("queued", "running") and run["id"] != holder]
    for run_id in lost:
        update_run(r, run_id, status="failed", error="lost: its worker stopped without recording an end",
                   finished=time.time())
    return lost


def start_pipeline(app: Celery, settings: Settings, trigger: str) -> str | None:
    """Take the lock and queue the stages; None if a run already holds the lock."""
    run_id = take_lock(client(settings), settings, trigger)
    if run_id is not None:
        chain(*(app.signature(name, args=(run_id,), immutable=True) for name in STAGES)).apply_async()
    return run_id


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
    # acks_late redelivers a stage whose worker died (OOM-killed, say): count the attempts, so that a stage that
    # kills its worker every time ends the run instead of holding the lock forever.
    attempts = r.hincrby(run_key(run_id), f"attempts:{name}", 1)
    if attempts > settings.stage_max_attempts:
        error = f"{name}: gave up after {attempts - 1} attempts (the worker died each time)"
        update_run(r, run_id, status="failed", error=error, finished=time.time())
        release_lock(r, run_id)
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
        update_run(r, run_id, status="failed", error=f"{name}: {type(exc).__name__}: {exc}", finished=time.time())
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
