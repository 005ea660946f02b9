"""The online loop end to end: real Redis, real Celery worker and beat processes, two real API replicas.

Feedback posted over HTTP -> beat sees enough of it -> reward model, PPO, evaluation, promotion ->
both replicas answer with the new adapter, without a restart.
"""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from redis.asyncio import Redis

from service.store import registry
from service.store.api_keys import create_key
from tests.server import ACCEPT_ALL, TRAINING, running_server, tiny_server_env

REJECT_ALL = {"CHATLOOP_GATE_MIN_SCORE_GAIN": "1000"}
FINISHED = {"promoted", "rejected", "failed", "superseded"}


@contextlib.contextmanager
def process(command: str, env: dict, log: Path):
    """A `chatloop <command>` process in its own process group, killed with all its children at the end."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli.main", command], env={**os.environ, **env},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def env(tiny_model_dir, tmp_path, redis_url, redis_sync):
    return tiny_server_env(tiny_model_dir, tmp_path, redis_url) | TRAINING


def give_feedback(url: str, prompts: int = 8, **sampling) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)
    for i in range(prompts):
        answer = client.chat.completions.create(
            model="chatloop", n=2, max_tokens=8, messages=[{"role": "user", "content": f"Tell me a fact, {i}"}],
            **sampling,
        )
        response = httpx.post(f"{url}/v1/comparisons", json={"completion_id": answer.id, "preferred": i % 2})
        assert response.status_code == 200, response.text


def admin_key(redis_url: str) -> str:
    async def make() -> str:
        client = Redis.from_url(redis_url, decode_responses=True)
        key, _ = await create_key(client, "admin", "tests")
        await client.aclose()
        return key

    return asyncio.run(make())


def production(redis_url: str) -> str:
    async def read() -> str:
        client = Redis.from_url(redis_url, decode_responses=True)
        try:
            return await registry.production(client)
        finally:
            await client.aclose()

    return asyncio.run(read())


def wait_run(url: str, key: str, run_id: str, until: set[str], timeout_s: float = 240, stage: str | None = None,
             poll_s: float = 0.5) -> dict:
    """The run once its status is in `until`, or once it is in `stage` where one is named."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = httpx.get(f"{url}/admin/tasks/{run_id}", headers={"Authorization": f"Bearer {key}"}).json()
        if run.get("status") in until or (stage is not None and run.get("stage") == stage):
            return run
        assert time.monotonic() < deadline, run
        time.sleep(poll_s)


def runs(url: str, key: str) -> list[dict]:
    return httpx.get(f"{url}/admin/runs", headers={"Authorization": f"Bearer {key}"}).json()


def test_feedback_leads_to_a_new_adapter_on_every_replica(env, tmp_path, redis_url):
    env = env | ACCEPT_ALL | {"CHATLOOP_RETRAIN_EVERY_S": "5"}
    with contextlib.ExitStack() as stack:
        replicas = [stack.enter_context(running_server(env, tmp_path / f"api{i}.log", fresh_redis=i == 0))
                    for i in range(2)]
        key = admin_key(redis_url)
        stack.enter_context(process("worker", env, tmp_path / "worker.log"))
        stack.enter_context(process("beat", env, tmp_path / "beat.log"))
        give_feedback(replicas[0])
        deadline = time.monotonic() + 240
        while not (started := runs(replicas[0], key)):
            assert time.monotonic() < deadline, (tmp_path / "beat.log").read_text()[-2000:]
            time.sleep(0.5)
        run = wait_run(replicas[0], key, started[0]["id"], FINISHED)
        assert run["status"] == "promoted", run
        version = run["candidate"]
        assert production(redis_url) == version
        assert run["trigger"] == "schedule" and run["evaluation"]["accepted"]
        assert run["reward_metrics"]["reward/cached_answers"] == 0  # the first run computes every answer's features
        for url in replicas:
            deadline = time.monotonic() + 10
            while httpx.get(f"{url}/readyz").json()["production_adapter"] != version:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)
            answer = client.chat.completions.create(model="chatloop", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=4)
            assert answer.system_fingerprint == version
        stats = httpx.get(f"{replicas[0]}/v1/feedback/stats").json()
        assert stats["new_since_training"] == 0  # the run consumed what it trained on


def test_a_rejected_candidate_is_never_promoted(env, tmp_path, redis_url):
    env = env | REJECT_ALL
    with running_server(env, tmp_path / "api.log") as url, process("worker", env, tmp_path / "worker.log"):
        key = admin_key(redis_url)
        give_feedback(url)
        response = httpx.post(f"{url}/admin/train", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 202
        run = wait_run(url, key, response.json()["run_id"], FINISHED)
        assert run["status"] == "rejected" and run["evaluation"]["reasons"]
        assert production(redis_url) == "base"
        assert run["candidate"] in httpx.get(f"{url}/admin/adapters",
                                             headers={"Authorization": f"Bearer {key}"}).text


def test_a_run_with_no_kl_room_ends_before_its_evaluation(env, tmp_path, redis_url):
    """With the gate's budget at 0 the contrast on served answers has no room and takes no step (the only
    iteration): the candidate is its parent, so the run is rejected with that reason instead of being evaluated."""
    env = env | {"CHATLOOP_GATE_MAX_KL": "0"}
    with running_server(env, tmp_path / "api.log") as url, process("worker", env, tmp_path / "worker.log"):
        key = admin_key(redis_url)
        give_feedback(url, temperature=0.7, top_p=1.0)  # PPO's own sampling: its served batch
        response = httpx.post(f"{url}/admin/train", headers={"Authorization": f"Bearer {key}"})
        run = wait_run(url, key, response.json()["run_id"], FINISHED)
        assert run["status"] == "rejected", run
        assert run["evaluation"]["reasons"][0].startswith("no training step"), run["evaluation"]
        assert run["evaluation"]["metrics"] == {} and run["policy"]["ppo/steps"] == 0 and run["policy"]["ppo/served"]
        assert production(redis_url) == "base"


def test_a_killed_worker_leaves_production_unchanged_and_the_next_run_succeeds(env, tmp_path, redis_url):
    lock_ttl_s = 12  # a heartbeat keeps a live stage's lock; this is how long a dead one's lingers
    env = env | ACCEPT_ALL | {"CHATLOOP_PIPELINE_LOCK_TTL_S": str(lock_ttl_s)}
    with running_server(env, tmp_path / "api.log") as url:
        key = admin_key(redis_url)
        headers = {"Authorization": f"Bearer {key}"}
        give_feedback(url)
        with process("worker", env, tmp_path / "worker1.log") as worker:
            first = httpx.post(f"{url}/admin/train", headers=headers).json()["run_id"]
            assert httpx.post(f"{url}/admin/train", headers=headers).status_code == 409  # one run at a time
            # The worker's start and the reward stage get as long as a whole run (slow CI machines need it).
            run = wait_run(url, key, first, FINISHED, stage="policy", poll_s=0.1)
            assert run["status"] not in FINISHED, run  # it ended before the stage it should be killed in
            os.killpg(worker.pid, signal.SIGKILL)  # mid-pipeline, no chance to clean up
        assert production(redis_url) == "base"
        time.sleep(lock_ttl_s + 1)  # the dead run's lock lapses
        with process("worker", env, tmp_path / "worker2.log"):
            response = httpx.post(f"{url}/admin/train", headers=headers)
            assert response.status_code == 202, response.text
            second = wait_run(url, key, response.json()["run_id"], FINISHED)
            assert second["status"] == "promoted"
            # The killed run's finished reward stage left its features in this worker's cache.
            assert second["reward_metrics"]["reward/cached_answers"] > 0
            assert production(redis_url) == second["candidate"]
            killed = httpx.get(f"{url}/admin/tasks/{first}", headers=headers).json()
            assert killed["status"] != "promoted" and killed.get("candidate") != second["candidate"]


def test_admin_routes_need_an_admin_key(env, tmp_path):
    with running_server(env, tmp_path / "api.log") as url:
        assert httpx.post(f"{url}/admin/train").status_code == 403  # anonymous (loopback) is not admin
        assert httpx.get(f"{url}/admin/adapters").status_code == 403
