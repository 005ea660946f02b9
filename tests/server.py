"""Start a real `chatloop serve` process on a free port for integration tests."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import redis

from service.cli.launcher import free_port


def tiny_server_env(model_dir: Path, data_dir: Path, redis_url: str) -> dict[str, str]:
    """Settings for a server on the tiny test model, with rate limits off unless a test sets them."""
    return {
        "CHATLOOP_BASE_MODEL": str(model_dir), "CHATLOOP_DATA_DIR": str(data_dir), "CHATLOOP_DTYPE": "float32",
        "CHATLOOP_MAX_CONTEXT": "256", "CHATLOOP_REDIS_URL": redis_url,
        "CHATLOOP_CHAT_REQUESTS_PER_MINUTE": "0", "CHATLOOP_FEEDBACK_REQUESTS_PER_MINUTE": "0",
    }



# Training small enough for the tiny model to finish a whole run in seconds, and a gate that passes anything.
TRAINING = {
    "CHATLOOP_REWARD_ENSEMBLE": "1", "CHATLOOP_PPO_ITERATIONS": "1", "CHATLOOP_PPO_BATCH_SIZE": "4",
    "CHATLOOP_PPO_MAX_NEW_TOKENS": "8", "CHATLOOP_EVAL_PROMPTS": "4", "CHATLOOP_LORA_R": "4",
    "CHATLOOP_LORA_ALPHA": "8", "CHATLOOP_MIN_NEW_FEEDBACK": "6", "CHATLOOP_THREADS": "1", "OMP_NUM_THREADS": "1",
    "CHATLOOP_PIPELINE_LOCK_TTL_S": "45", "CHATLOOP_TASK_VISIBILITY_TIMEOUT_S": "60",
    "CHATLOOP_AB_SHARE": "0",  # the offline checks alone promote; tests/workers/test_ab_gate.py tests the A/B test
}
ACCEPT_ALL = {"CHATLOOP_GATE_MIN_SCORE_GAIN": "-1000", "CHATLOOP_GATE_MAX_KL": "1000",
              "CHATLOOP_GATE_MIN_LENGTH_RATIO": "0"}


@contextlib.contextmanager
def running_server(
    env: dict[str, str], log_path: Path, timeout_s: float = 180, fresh_redis: bool = True
) -> Iterator[str]:
    """Yield the server's base URL once /readyz says ready; stop the process afterwards.

    fresh_redis flushes the server's Redis database first, so nothing an earlier test module left
    there (a production adapter pointer, say) leaks into this server's start.
    """
    if fresh_redis and "CHATLOOP_REDIS_URL" in env:
        redis.Redis.from_url(env["CHATLOOP_REDIS_URL"]).flushdb()
    port = free_port()
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=full_env, stdout=log, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited early:\n{log_path.read_text()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server not ready:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.25)
            yield url
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
