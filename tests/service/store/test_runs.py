"""Training run records and files in Redis: only plain file names are written out, and old runs are pruned."""

import pytest

from service.settings import Settings
from service.store import runs


@pytest.fixture
def settings(redis_url, redis_sync):  # redis_sync flushed the database
    return Settings(redis_url=redis_url, keep_runs=3)


def test_a_directory_travels_through_redis(settings, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "adapter_model.safetensors").write_bytes(b"\x00weights")
    (source / "feedback.jsonl").write_text("{}\n")
    runs.put_dir(settings, "r1", "reward", source)
    out = runs.get_dir(settings, "r1", "reward", tmp_path / "out")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == {f.name: f.read_bytes() for f in source.iterdir()}


@pytest.mark.parametrize("name", ["../escaped", "/tmp/escaped", "sub/escaped", "..", ".", "", "a\\b"])
def test_names_that_are_paths_are_refused_and_nothing_is_written(settings, redis_sync, tmp_path, name):
    """Anyone who can write to Redis must not be able to place a file outside the stage's directory."""
    dest = tmp_path / "work" / "rm"
    redis_sync.hset(runs.files_key("r1", "reward"), mapping={"config.json": "{}", name: "payload"})
    with pytest.raises(runs.UnsafeFileName, match="not plain file names"):
        runs.get_dir(settings, "r1", "reward", dest)
    assert not dest.exists() and not (tmp_path / "work" / "escaped").exists()


def finished_run(redis_sync, settings, tmp_path, status: str = "rejected", trained_reward: bool = True) -> str:
    run_id = runs.take_lock(redis_sync, settings, "test")
    for name in ("data", "reward") if trained_reward else ("data",):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "file.bin").write_bytes(run_id.encode())
        runs.put_dir(settings, run_id, name, tmp_path / name)
    fields = {"status": status} | ({"reward_metrics": {"accuracy": 0.6}} if trained_reward else {})
    runs.update_run(redis_sync, run_id, **fields)
    runs.release_lock(redis_sync, run_id)
    return run_id


def has_files(redis_sync, run_id: str) -> bool:
    return bool(redis_sync.exists(runs.files_key(run_id, "data")))


def has_reward_model(redis_sync, run_id: str) -> bool:
    return bool(redis_sync.exists(runs.files_key(run_id, "reward")))


def test_old_runs_and_finished_runs_files_are_pruned(settings, redis_sync, tmp_path):
    ids = [finished_run(redis_sync, settings, tmp_path) for _ in range(4)]
    ids.append(finished_run(redis_sync, settings, tmp_path, status="failed", trained_reward=False))
    current = runs.take_lock(redis_sync, settings, "test")  # a run starting prunes; its own record is the newest
    assert redis_sync.lrange(runs.RUNS, 0, -1) == [current, ids[4], ids[3]]
    assert all(runs.get_run(redis_sync, old) is None and not has_files(redis_sync, old) for old in ids[:3])
    assert not redis_sync.keys(f"{runs.run_key(ids[0])}*")
    # Finished runs that stay keep only their reward model; a failed one that trained none keeps nothing.
    assert not has_files(redis_sync, ids[3]) and has_reward_model(redis_sync, ids[3])
    assert not redis_sync.smembers(runs.dirs_key(ids[4])) and runs.get_run(redis_sync, ids[4])["status"] == "failed"


def test_an_unfinished_run_keeps_its_files(settings, redis_sync, tmp_path):
    running = finished_run(redis_sync, settings, tmp_path, status="ab_test")
    finished_run(redis_sync, settings, tmp_path)
    finished_run(redis_sync, settings, tmp_path)
    assert has_files(redis_sync, running)


def test_a_run_that_ends_keeps_only_its_reward_model(settings, redis_sync, tmp_path):
    first = finished_run(redis_sync, settings, tmp_path)
    second = finished_run(redis_sync, settings, tmp_path)
    for run_id in (first, second):
        assert not has_files(redis_sync, run_id) and has_reward_model(redis_sync, run_id)
