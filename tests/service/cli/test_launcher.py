"""`chatloop up`: embedded Redis, API, worker and beat as one stack; clean stops; data kept across starts."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import redis

from tests.server import free_port, tiny_server_env


def processes_of(data_dir: Path) -> list[tuple[int, str]]:
    """Every live process started for this data dir (children inherit CHATLOOP_DATA_DIR)."""
    marker = f"CHATLOOP_DATA_DIR={data_dir}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                found.append((int(proc.name), (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except OSError:
            continue
    return found


def redis_up(env: dict) -> bool:
    try:
        return redis.Redis(port=int(env["CHATLOOP_EMBEDDED_REDIS_PORT"]), socket_connect_timeout=1).ping()
    except redis.ConnectionError:
        return False


class Stack:
    def __init__(self, env: dict, log: Path) -> None:
        self.log = log
        self.out = open(log, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli.main", "up"], env=env, stdout=self.out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, url: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.25)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=60)
        self.out.close()
        return code


@pytest.fixture
def env(tiny_model_dir, tmp_path, redis_url):
    env = {**os.environ, **tiny_server_env(tiny_model_dir, tmp_path, redis_url)}
    for name in ("CHATLOOP_REDIS_URL", "REDIS_URL"):
        env.pop(name, None)
    return env | {"CHATLOOP_PORT": str(free_port()), "CHATLOOP_EMBEDDED_REDIS_PORT": str(free_port())}


def test_up_runs_everything_stops_cleanly_and_keeps_the_data(env, tmp_path):
    url = f"http://127.0.0.1:{env['CHATLOOP_PORT']}"
    stack = Stack(env, tmp_path / "up.log")
    try:
        stack.wait_ready(url)
        commands = " ".join(cmd for _, cmd in processes_of(tmp_path))
        assert all(f"service.cli.main {part}" in commands for part in ("serve", "worker", "beat")), commands
        assert redis_up(env)  # redis-server rewrites its environ (process title), so ask its port
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)
        answer = client.chat.completions.create(model="chatloop", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4)
        assert httpx.post(f"{url}/v1/feedback", json={"completion_id": answer.id, "rating": "up"}).status_code == 200
    finally:
        assert stack.stop() == 0
    first_log = (tmp_path / "up.log").read_text()
    assert "chat at http://127.0.0.1:" in first_log and "admin key (shown once" in first_log
    assert processes_of(tmp_path) == [] and not redis_up(env)  # no orphans

    again = Stack(env, tmp_path / "up2.log")
    try:
        again.wait_ready(url)
        assert httpx.get(f"{url}/v1/feedback/stats").json()["thumbs_up"] == 1  # kept by the append-only file
    finally:
        assert again.stop() == 0
    assert "admin key" not in (tmp_path / "up2.log").read_text()
    assert processes_of(tmp_path) == [] and not redis_up(env)


def test_a_dying_child_stops_the_whole_stack(env, tmp_path):
    url = f"http://127.0.0.1:{env['CHATLOOP_PORT']}"
    stack = Stack(env, tmp_path / "up.log")
    try:
        stack.wait_ready(url)
        beat = next(pid for pid, cmd in processes_of(tmp_path) if cmd.endswith("service.cli.main beat "))
        os.kill(beat, signal.SIGKILL)
        assert stack.proc.wait(timeout=60) == 1
    finally:
        stack.stop()
    assert "beat exited" in (tmp_path / "up.log").read_text()
    assert processes_of(tmp_path) == []


@pytest.mark.parametrize("variable", ["CHATLOOP_REDIS_URL", "REDIS_URL"])
def test_a_named_redis_that_does_not_answer_stops_the_start(env, tmp_path, variable):
    """Starting the embedded Redis instead would split the data between two Redis servers."""
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"  # nothing listens there
    done = subprocess.run([sys.executable, "-m", "service.cli.main", "up"], env=env | {variable: url},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in done.stderr and "secret" not in done.stderr
    assert not redis_up(env) and not (tmp_path / "redis").exists()
    assert processes_of(tmp_path) == []
