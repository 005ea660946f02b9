"""Simulated users: how they vote, and a population talking to a real server over HTTP."""

import asyncio
import collections
import json
import random
import statistics
import subprocess
import sys

import httpx
import httpx2
import openai
import pytest

from bench.preferences import load_prompts, vader
from bench.users import MODEL, EventBudget, UserConfig, pick, retry_delay, run_users, thumb
from service.feedback.events import FeedbackEvent
from service.serving.adapters import PRODUCTION_MODEL
from service.store import redis_keys
from service.store.api_keys import create_key
from tests.server import running_server, tiny_server_env

REQUEST = httpx.Request("POST", "http://127.0.0.1/v1/feedback")


def test_users_ask_for_the_production_model():
    assert MODEL == PRODUCTION_MODEL


def test_pick_follows_the_scores_and_noise_flips_it():
    rng = random.Random(0)
    assert pick([0.2, 0.7], 0.0, rng) == 1 and pick([0.7, 0.2], 0.0, rng) == 0
    assert pick([0.2, 0.7], 1.0, rng) == 0
    assert pick([0.5, 0.5], 1.0, rng) == "tie"  # no difference to flip
    flips = sum(pick([0.0, 1.0], 0.25, rng) == 0 for _ in range(4000))
    assert 900 < flips < 1100


def test_thumb_up_above_the_threshold():
    rng = random.Random(0)
    assert thumb(0.6, 0.5, 0.0, rng) == "up" and thumb(0.5, 0.5, 0.0, rng) == "down"
    assert thumb(0.6, 0.5, 1.0, rng) == "down"


def test_retry_only_what_can_succeed_later():
    def status(code: int, **headers: str) -> httpx.HTTPStatusError:
        response = httpx.Response(code, headers=headers, request=REQUEST)
        return httpx.HTTPStatusError("", request=REQUEST, response=response)

    assert retry_delay(status(429, **{"Retry-After": "7"}), 0) == 7.0
    assert retry_delay(status(429), 2) == 2.0
    assert retry_delay(status(503), 0) == 0.5 and retry_delay(status(500), 10) == 10.0
    assert retry_delay(httpx.ConnectError("refused", request=REQUEST), 1) == 1.0
    # the openai client is built on httpx2, so its errors carry httpx2 responses
    chat_request = httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions")
    limited = httpx2.Response(429, headers={"Retry-After": "4"}, request=chat_request)
    assert retry_delay(openai.RateLimitError("", response=limited, body=None), 0) == 4.0
    busy = httpx2.Response(503, request=chat_request)
    assert retry_delay(openai.InternalServerError("", response=busy, body=None), 1) == 1.0
    assert retry_delay(openai.APIConnectionError(request=chat_request), 0) == 0.5
    assert retry_delay(openai.APITimeoutError(request=chat_request), 0) == 0.5
    gone = httpx2.Response(404, request=chat_request)
    assert retry_delay(openai.NotFoundError("", response=gone, body=None), 0) is None
    for code in (400, 401, 403, 404, 422):
        assert retry_delay(status(code), 0) is None


def test_event_budget_hands_out_exactly_the_limit():
    budget = EventBudget(3)
    assert [budget.take() for _ in range(5)] == [True, True, True, False, False]
    assert all(EventBudget(None).take() for _ in range(100))


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, redis_url):
    data = tmp_path_factory.mktemp("data")
    with running_server(tiny_server_env(tiny_model_dir, data, redis_url), data / "server.log") as url:
        yield url


def feedback_stats(server: str) -> dict[str, int]:
    return httpx.get(f"{server}/v1/feedback/stats").json()


async def test_users_vote_as_their_preference_says(server, redis_sync):
    config = UserConfig(compare_fraction=0.5, noise=0.0, max_tokens=8, concurrency=2, seed=3)
    seen = []
    stats = await run_users(server, load_prompts(split="train"), config, max_events=12,
                            on_event=lambda s: seen.append(s.feedback_events))
    assert seen == list(range(1, 13))
    assert stats.requests == 12 and stats.answers == 12 + stats.comparisons and stats.errors == 0
    assert stats.comparisons > 0 and stats.thumbs_up + stats.thumbs_down > 0
    counts = feedback_stats(server)
    assert counts["events"] == stats.feedback_events == 12
    assert {name: counts.get(name, 0) for name in ("thumbs_up", "thumbs_down", "comparisons", "ties")} == {
        "thumbs_up": stats.thumbs_up, "thumbs_down": stats.thumbs_down, "comparisons": stats.comparisons,
        "ties": stats.ties,
    }

    events = [FeedbackEvent.from_json(fields["event"]) for _, fields in redis_sync.xrange(redis_keys.EVENTS)]
    # Anonymous callers are one voter to the service; the end users they name are kept on the events.
    assert {e.voter for e in events} == {"anonymous"} and {e.user for e in events} == {"sim-0", "sim-1"}
    heldout = set(load_prompts(split="heldout"))
    assert not any(e.prompt[0]["content"] in heldout for e in events)
    scores, picks = [], 0
    for event in events:
        answer_scores = [vader(a.text, a.finish_reason or "") for a in event.answers]
        scores += answer_scores
        if event.kind == "thumb":
            assert (event.rating == 1) == (answer_scores[0] > config.threshold)
        elif event.verdict == "tie":
            assert answer_scores[0] == answer_scores[1]
        else:
            assert answer_scores[event.preferred] > answer_scores[1 - event.preferred], event
            picks += 1
    assert picks > 0  # some answers told apart, so the check above checked something
    assert stats.mean_score == pytest.approx(statistics.mean(scores))


async def test_people_take_the_seats_in_turn_each_a_voter_of_their_own(server, redis_sync, aredis):
    """With more keys than users, seat i takes keys i, i + 2, ... for turns_per_person turns each: the service hears
    from many voters, none casting more than a visit's votes (the seats share 12 events, so a seat may not finish
    its last visit, and none runs out of people)."""
    keys = [(await create_key(aredis, "user", f"person-{i}"))[0] for i in range(8)]
    config = UserConfig(max_tokens=4, concurrency=2, turns_per_person=3, seed=5)
    await run_users(server, load_prompts(split="train"), config, max_events=12, api_key=keys)
    events = [FeedbackEvent.from_json(fields["event"]) for _, fields in redis_sync.xrange(redis_keys.EVENTS)]
    per_voter = collections.Counter(e.voter for e in events)
    assert len(events) == 12 and all(v.startswith("key:") for v in per_voter)
    assert max(per_voter.values()) <= 3 and len(per_voter) >= 4
    assert {e.user for e in events} <= {f"sim-{seat}-{person}" for seat in (0, 1) for person in range(4)}


async def test_stop_and_duration_end_a_run(server, redis_sync):
    stop = asyncio.Event()
    config = UserConfig(max_tokens=8, concurrency=2)
    stats = await run_users(server, ["How do tides work?"], config, stop=stop,
                            on_event=lambda s: s.feedback_events >= 2 and stop.set())
    assert stats.feedback_events >= 2
    stats = await run_users(server, ["How do tides work?"], config, duration_s=1.0)
    assert stats.elapsed_s < 5


def test_the_users_command(server, redis_sync):
    result = subprocess.run(
        [sys.executable, "-m", "bench.users", "--url", server, "--events", "3", "--users", "2", "--max-tokens", "8",
         "--preference", "concise", "--seed", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["feedback_events"] == stats["requests"] == 3 and stats["errors"] == 0
    assert stats["mean_score"] == -1.0  # eight tokens of a random model never end with EOS: all cut off
    assert feedback_stats(server)["events"] == 3
