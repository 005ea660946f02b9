"""The whole service as a child process for benchmarks: `chatloop up` (embedded Redis, API, worker, beat).

Its own data dir and free ports, so a benchmark never touches a Redis or a data dir in use; the base model
directory is shared (converted once). Output goes to a log file. Stopping is `chatloop up`'s own Ctrl-C path,
which stops the API, worker and beat, then Redis, and leaves no process behind.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.cli.launcher import free_port


class Stack:
    def __init__(self, data_dir: Path, base_model: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir, self.base_model = data_dir, base_model
        self.port, self.redis_port = free_port(0), free_port(0)
        self.url = f"http://127.0.0.1:{self.port}"
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.log_path = data_dir / "stack.log"
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CHATLOOP_REDIS_URL")}
        return env | {
            "CHATLOOP_DATA_DIR": str(self.data_dir),
            "CHATLOOP_BASE_MODEL": str(self.base_model),
            "CHATLOOP_HOST": "127.0.0.1",
            "CHATLOOP_PORT": str(self.port),
            "CHATLOOP_EMBEDDED_REDIS_PORT": str(self.redis_port),
            **self.extra_env,
        }

    def start(self, timeout_s: float = 600) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli.main", "up"], env=self.env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chatloop up exited with {self.proc.returncode}; see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the service was not ready within {timeout_s:.0f} s; see {self.log_path}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 90) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
