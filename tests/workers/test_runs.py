"""A run that cannot finish ends instead of blocking every later one: the stage attempt cap, lost runs, and the
backoff after failures (real Redis; the stage through Celery's own eager apply, no worker needed)."""

import time

from service.settings import Settings
from service.store import runs
from workers.runs import mark_lost_runs
from workers.tasks import backoff_s, train_reward


def test_backoff_doubles_per_consecutive_failure_up_to_the_cap():
    settings = Settings(retrain_every_s=60, retrain_max_backoff_s=300)
    now = 1000.0
    assert backoff_s([], settings, now) == 0
    assert backoff_s([{"status": "promoted", "finished": now}], settings, now) == 0
    assert backoff_s([{"status": "failed", "finished": now - 20}], settings, now) == 120 - 20
    two = [{"status": "failed", "finished": now}, {"status": "failed", "finished": now - 500}]
    assert backoff_s(two, settings, now) == 240
    many = [{"status": "failed", "finished": now}] * 5 + [{"status": "rejected"}]
    assert backoff_s(many, settings, now) == 300  # 60 * 2^5 capped
    assert backoff_s([{"status": "failed", "finished": now - 1000}], settings, now) == 0  # waited long enough


def test_runs_that_lost_their_lock_are_marked_failed(redis_url, redis_sync):
    settings = Settings(redis_url=redis_url)
    r = runs.client(settings)
    old = runs.take_lock(r, settings, "test")
    runs.update_run(r, old, status="running", stage="policy")
    redis_sync.delete(runs.LOCK)  # its worker was killed at the hard time limit: the lock lapsed
    current = runs.take_lock(r, settings, "test")
    runs.update_run(r, "waiting", id="waiting", status="ab_test")
    r.lpush(runs.RUNS, "waiting")
    assert mark_lost_runs(r) == [old]
    assert runs.get_run(r, old)["status"] == "failed" and "lost" in runs.get_run(r, old)["error"]
    assert runs.get_run(r, current)["status"] == "queued"  # holds the lock
    assert runs.get_run(r, "waiting")["status"] == "ab_test"  # an A/B test holds no lock and is not lost


def test_a_stage_that_keeps_killing_its_worker_gives_up(redis_url, redis_sync, monkeypatch, tmp_path):
    monkeypatch.setenv("CHATLOOP_REDIS_URL", redis_url)
    monkeypatch.setenv("CHATLOOP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CHATLOOP_STAGE_MAX_ATTEMPTS", "2")
    from service.settings import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    r = runs.client(settings)
    run_id = runs.take_lock(r, settings, "test")
    redis_sync.hset(runs.run_key(run_id), "attempts:reward", 2)  # two deliveries died before this one
    result = train_reward.apply(args=(run_id,))
    get_settings.cache_clear()
    assert result.state == "IGNORED"
    run = runs.get_run(r, run_id)
    assert run["status"] == "failed" and "gave up after 2 attempts" in run["error"]
    assert redis_sync.get(runs.LOCK) is None and run["finished"] <= time.time()
