"""deploy/nginx.conf in a real nginx, when one is installed: a stream passes chunk by chunk, and a
replica that is still loading (503) or refuses connections is skipped for a healthy one.

The stream check is end to end, not a test of `proxy_buffering off` alone: the nginx tried here (1.22)
forwarded these small events promptly even with buffering (or gzip) on, so the directives themselves are
asserted in test_compose.py. Retrying a POST after a 503 does depend on `non_idempotent`, and is caught.

The replicas are small stand-in servers (no model); only the upstream lines of the config are rewritten
(to their addresses, without `resolve`, which needs a hostname and nginx 1.27.3+) and the listen port.
"""

import asyncio
import contextlib
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from tests.deploy.files import NGINX_CONF, tool
from tests.server import free_port

NGINX = tool("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="no nginx binary here (Debian: apt-get install nginx-light)")

HOLD_S = 10  # how long the stand-in holds its stream at each step unless the test releases it


class Replica:
    """A stand-in API replica: 'ok' answers (an SSE stream that waits for the test between events, or JSON),
    'loading' answers 503."""

    def __init__(self, mode: str) -> None:
        self.mode, self.hits, self.port = mode, 0, free_port()
        self.steps = [threading.Event(), threading.Event()]

    async def chat(self, request: Request):
        self.hits += 1
        if self.mode == "loading":
            return JSONResponse({"error": {"message": "not ready", "code": "not_ready"}}, status_code=503)
        if not (await request.json()).get("stream"):
            return JSONResponse({"replica": self.port})

        async def events():
            # The first event goes out with the headers, which nginx forwards at once even when buffering;
            # the second one shows whether a chunk in the middle of a stream is passed on as it comes.
            yield b'data: {"event": 1}\n\n'
            await asyncio.to_thread(self.steps[0].wait, HOLD_S)
            yield b'data: {"event": 2}\n\n'
            await asyncio.to_thread(self.steps[1].wait, HOLD_S)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @contextlib.contextmanager
    def running(self) -> Iterator["Replica"]:
        app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "stand-in replica did not start"
            time.sleep(0.02)
        try:
            yield self
        finally:
            for step in self.steps:
                step.set()
            server.should_exit = True
            thread.join(timeout=10)


@contextlib.contextmanager
def running_nginx(upstream_ports: list[int], workdir: Path) -> Iterator[tuple[str, Path]]:
    """deploy/nginx.conf with its upstream pointed at the given ports; yields its URL and error log."""
    text = NGINX_CONF.read_text()
    server_line = re.search(r"^(\s*)server api:\d+ ([^;]*);", text, re.M)
    params = " ".join(p for p in server_line[2].split() if p != "resolve")
    servers = "\n".join(f"{server_line[1]}server 127.0.0.1:{port} {params};" for port in upstream_ports)
    port = free_port()
    text = text.replace(server_line[0], servers)
    text = re.sub(r"^(\s*)listen \d+;", rf"\g<1>listen 127.0.0.1:{port};", text, flags=re.M)
    text = re.sub(r"^(\s*)(access|error)_log [^;]*;", r"\g<1>\2_log off;", text, flags=re.M).replace(
        "error_log off;", f"error_log {workdir / 'error.log'} info;"
    )
    (workdir / "nginx.conf").write_text(text)
    globals_ = f"daemon off; pid {workdir / 'nginx.pid'}; user root;"
    command = [
        NGINX,
        "-p",
        str(workdir),
        "-c",
        str(workdir / "nginx.conf"),
        "-e",
        str(workdir / "error.log"),
        "-g",
        globals_,
    ]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/lb-healthz", timeout=1).status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, (workdir / "error.log").read_text()
            time.sleep(0.05)
        yield url, workdir / "error.log"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_config_passes_nginx_t_and_with_no_replica_up_answers_502(tmp_path: Path):
    # running_nginx runs `nginx -t` first and waits for the balancer's own health route
    with running_nginx([free_port()], tmp_path) as (url, _):
        assert httpx.get(f"{url}/lb-healthz", timeout=5).status_code == 200
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 502


def test_stream_passes_chunk_by_chunk_and_a_loading_replica_is_skipped(tmp_path: Path):
    with (
        Replica("loading").running() as loading,
        Replica("ok").running() as ok,
        running_nginx([loading.port, ok.port], tmp_path) as (url, _),
    ):
        for _ in range(2):  # both replicas get picked at least once: the loading one is retried on the other
            for step in ok.steps:
                step.clear()
            body = {"model": "chatloop", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=HOLD_S * 3) as response:
                assert response.status_code == 200
                lines = (line for line in response.iter_lines() if line)
                assert next(lines) == 'data: {"event": 1}'
                ok.steps[0].set()
                started = time.monotonic()
                assert next(lines) == 'data: {"event": 2}'
                # Held back, it would only come out with the end of the stream, which the replica delays.
                assert time.monotonic() - started < HOLD_S / 2, "an event in mid-stream was held back"
                ok.steps[1].set()
                assert list(lines) == ["data: [DONE]"]
        assert loading.hits >= 1 and ok.hits == 2


def test_a_refused_connection_is_retried_on_another_replica(tmp_path: Path):
    dead = free_port()  # nothing listens there
    with Replica("ok").running() as ok, running_nginx([dead, ok.port], tmp_path) as (url, error_log):
        for _ in range(4):
            response = httpx.post(f"{url}/v1/chat/completions", json={"stream": False}, timeout=10)
            assert response.status_code == 200 and response.json() == {"replica": ok.port}
        assert ok.hits == 4
        assert "Connection refused" in error_log.read_text()


def test_metrics_are_not_served_through_the_load_balancer(tmp_path: Path):
    with Replica("ok").running() as ok, running_nginx([ok.port], tmp_path) as (url, _):
        assert httpx.get(f"{url}/metrics", timeout=5).status_code == 403
