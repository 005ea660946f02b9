"""Simulated users: a population that chats with a running chatloop over HTTP and gives feedback.

Each user asks a prompt, scores the answers with a fixed preference (bench/preferences.py), and
votes the way a person with that taste would: a thumb on a single answer (up when the score passes
a threshold), or, on a share of turns, two answers from one request (n=2) and the better one picked.
A little noise flips some votes, as people are not perfectly consistent. They use the same clients
a real application would (the `openai` package for chat, plain HTTP for feedback), so a benchmark
built on them exercises the whole service: auth, rate limits, the completion log, the feedback store.
"""

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import httpx
import openai
from openai.types.chat import ChatCompletion

from bench.preferences import Preference, get_preference

log = logging.getLogger(__name__)
T = TypeVar("T")

MODEL = "chatloop"  # the production alias (service.serving.adapters.PRODUCTION_MODEL; not imported: it pulls in torch)
PROGRESS_EVERY_S = 10.0
RECENT_ANSWERS = 100  # the window of UserStats.recent_score
MAX_BACKOFF_S = 10.0
TIMEOUT_S = 120.0  # a queued answer on a busy CPU server can take a while


@dataclass
class UserConfig:
    preference: str = "vader"
    compare_fraction: float = 0.5  # share of turns that ask for two answers and compare them
    threshold: float = 0.5  # a single answer gets a thumb up when its score is above this
    noise: float = 0.1  # probability a thumb or a comparison pick is flipped
    max_tokens: int = 64
    temperature: float = 0.7
    concurrency: int = 4  # users talking at once
    think_time_s: float = 0.0  # mean pause between a user's turns (exponential, like independent arrivals)
    # A person's visit: with more API keys than users, after this many turns the next person (key) takes the
    # seat, so a long run hears from many voters as a service does, not from a handful voting all day
    turns_per_person: int = 25
    seed: int = 0


@dataclass
class UserStats:
    """Counts as the service would count them (comparisons include ties), plus the preference's score
    of every answer seen: its running mean is how a caller watches the policy learn."""

    requests: int = 0  # chat completions answered
    answers: int = 0  # answers scored: one per thumb turn, two per comparison turn
    thumbs_up: int = 0
    thumbs_down: int = 0
    comparisons: int = 0
    ties: int = 0
    errors: int = 0  # failed attempts; each was retried
    feedback_events: int = 0
    score_sum: float = 0.0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_ANSWERS))
    started: float = field(default_factory=time.monotonic)

    @property
    def mean_score(self) -> float:
        return self.score_sum / self.answers if self.answers else 0.0

    @property
    def recent_score(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else 0.0

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def add_scores(self, scores: list[float]) -> None:
        self.answers += len(scores)
        self.score_sum += sum(scores)
        self.recent.extend(scores)

    def count_vote(self, body: dict) -> None:
        """Count a vote the service accepted, the way the service counts it."""
        if "rating" in body:
            self.thumbs_up += body["rating"] == "up"
            self.thumbs_down += body["rating"] == "down"
        else:
            self.comparisons += 1
            self.ties += body["preferred"] == "tie"
        self.feedback_events += 1

    def as_dict(self) -> dict[str, float | int]:
        counts = ("requests", "answers", "thumbs_up", "thumbs_down", "comparisons", "ties", "errors", "feedback_events")
        return {
            **{name: getattr(self, name) for name in counts},
            "mean_score": round(self.mean_score, 4),
            "recent_score": round(self.recent_score, 4),
            "elapsed_s": round(self.elapsed_s, 1),
        }

    def summary(self) -> str:
        return (f"{self.feedback_events} events ({self.thumbs_up} up, {self.thumbs_down} down, "
                f"{self.comparisons} comparisons, {self.ties} ties), mean score {self.mean_score:.3f} "
                f"(last {len(self.recent)}: {self.recent_score:.3f}), {self.errors} errors")


def thumb(score: float, threshold: float, noise: float, rng: random.Random) -> Literal["up", "down"]:
    up = score > threshold
    if rng.random() < noise:
        up = not up
    return "up" if up else "down"


def pick(scores: Sequence[float], noise: float, rng: random.Random) -> int | Literal["tie"]:
    """The index of the better of two answers, or "tie" when the preference cannot tell them apart
    (noise does not break a tie: a person who sees no difference says so)."""
    first, second = scores
    if first == second:
        return "tie"
    better = 0 if first > second else 1
    return 1 - better if rng.random() < noise else better


def retry_delay(exc: Exception, attempt: int) -> float | None:
    """Seconds to wait before trying again, or None when trying again cannot help (a 4xx other than 429
    is a mistake in the request or the setup, and repeating it changes nothing)."""
    backoff = min(0.5 * 2 ** min(attempt, 8), MAX_BACKOFF_S)  # capped, so a long outage cannot overflow it
    if isinstance(exc, openai.APIConnectionError | httpx.TransportError):
        return backoff
    if isinstance(exc, openai.APIStatusError | httpx.HTTPStatusError):
        status = exc.response.status_code
        if status == 429:
            with contextlib.suppress(ValueError):
                return float(exc.response.headers.get("retry-after", ""))
            return backoff
        if status >= 500:
            return backoff
    return None


class EventBudget:
    """Shares max_events among the users: a turn takes a slot before it starts, so exactly that many
    feedback events are sent, however many users are talking."""

    def __init__(self, limit: int | None) -> None:
        self.left = limit

    def take(self) -> bool:
        if self.left is None:
            return True
        if self.left <= 0:
            return False
        self.left -= 1
        return True


class SimulatedUser:
    def __init__(
        self, name: str, rng: random.Random, prompts: Sequence[str], config: UserConfig, preference: Preference,
        people: Sequence[tuple[openai.AsyncOpenAI, httpx.AsyncClient]], stats: UserStats, budget: EventBudget,
        on_event: Callable[[UserStats], None] | None,
    ) -> None:
        """people: the clients (one per API key) of the people who take this seat in turn."""
        self.seat, self.rng, self.prompts, self.config, self.preference = name, rng, prompts, config, preference
        self.people, self.stats, self.budget, self.on_event = people, stats, budget, on_event
        self.turns = 0
        self.person = -1
        self.next_person()

    def next_person(self) -> None:
        self.person += 1
        self.chat, self.http = self.people[self.person % len(self.people)]
        self.name = f"{self.seat}-{self.person}" if len(self.people) > 1 else self.seat

    async def run(self) -> None:
        while self.budget.take():
            if self.turns and len(self.people) > 1 and self.turns % self.config.turns_per_person == 0:
                self.next_person()
            self.turns += 1
            await self.turn()
            if self.config.think_time_s > 0:
                await asyncio.sleep(self.rng.expovariate(1 / self.config.think_time_s))

    async def turn(self) -> None:
        prompt = self.rng.choice(self.prompts)
        compare = self.rng.random() < self.config.compare_fraction
        seed = self.rng.randrange(2**31)
        completion = await self.retrying("chat", lambda: self.ask(prompt, 2 if compare else 1, seed))
        self.stats.requests += 1
        scores = [self.preference(c.message.content or "", c.finish_reason or "") for c in completion.choices]
        self.stats.add_scores(scores)
        if compare:
            preferred = pick(scores, self.config.noise, self.rng)
            route, body = "comparisons", {"completion_id": completion.id, "preferred": preferred}
        else:
            rating = thumb(scores[0], self.config.threshold, self.config.noise, self.rng)
            route, body = "feedback", {"completion_id": completion.id, "choice_index": 0, "rating": rating}
        await self.retrying(route, lambda: self.send(route, body))
        self.stats.count_vote(body)
        if self.on_event is not None:
            self.on_event(self.stats)

    async def ask(self, prompt: str, n: int, seed: int) -> ChatCompletion:
        """The seed comes from the user's own generator, so a run with the same seed samples the same answers
        from the same weights (the server gives choice i the seed + i)."""
        return await self.chat.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], n=n, max_tokens=self.config.max_tokens,
            temperature=self.config.temperature, user=self.name, seed=seed,
        )

    async def send(self, route: str, body: dict) -> None:
        """Casting the same vote twice changes nothing on the server, so a retry after a lost reply is safe."""
        response = await self.http.post(route, json=body)
        if response.is_error:
            message = f"POST /v1/{route} answered {response.status_code}: {response.text}"
            raise httpx.HTTPStatusError(message, request=response.request, response=response)

    async def retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await call()
            except (openai.APIError, httpx.HTTPError) as exc:
                delay = retry_delay(exc, attempt)
                if delay is None:
                    raise
                self.stats.errors += 1
                attempt += 1
                log.warning("%s: %s failed (%s); retrying in %.1f s", self.name, what, _describe(exc), delay)
                await asyncio.sleep(delay)


def _describe(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    return f"HTTP {response.status_code}" if response is not None else type(exc).__name__


async def _report_progress(stats: UserStats) -> None:
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        log.info("simulate: %s", stats.summary())


async def run_users(
    base_url: str,
    prompts: Sequence[str],
    config: UserConfig | None = None,
    *,
    stop: asyncio.Event | None = None,
    max_events: int | None = None,
    duration_s: float | None = None,
    api_key: str | Sequence[str] | None = None,
    on_event: Callable[[UserStats], None] | None = None,
) -> UserStats:
    """Run config.concurrency users against the service at base_url until max_events feedback events
    were sent, duration_s passed, or stop was set, whichever comes first (none of them: until cancelled).
    A stop or timeout abandons the turns in flight; max_events lets them finish, so the counts are exact.
    api_key: one key for everyone, one per user (user i takes key i modulo their number: each key is a voter
    of its own to the service), more keys than users (user i takes keys i, i + concurrency, ... in turn, each
    for config.turns_per_person turns: people come and go), or none (anonymous, allowed on loopback)."""
    config = config or UserConfig()
    if not prompts:
        raise ValueError("no prompts to ask")
    preference = get_preference(config.preference)
    stats, budget = UserStats(), EventBudget(max_events)
    root = base_url.rstrip("/") + "/v1"
    keys = [api_key] if api_key is None or isinstance(api_key, str) else list(api_key)
    clients = []
    async with contextlib.AsyncExitStack() as stack:
        for key in keys:
            # "EMPTY" is not a chatloop key, so the server treats the caller as anonymous (allowed on loopback)
            chat = openai.AsyncOpenAI(base_url=root, api_key=key or "EMPTY", max_retries=0, timeout=TIMEOUT_S)
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            http = httpx.AsyncClient(base_url=root + "/", headers=headers, timeout=TIMEOUT_S)
            clients.append((await stack.enter_async_context(chat), await stack.enter_async_context(http)))
        users = [
            SimulatedUser(f"sim-{i}", random.Random(config.seed + i), prompts, config, preference,
                          clients[i::config.concurrency] or [clients[i % len(clients)]], stats, budget, on_event)
            for i in range(config.concurrency)
        ]
        tasks = [asyncio.create_task(user.run()) for user in users]
        everyone = asyncio.gather(*tasks)
        stopped = asyncio.ensure_future((stop or asyncio.Event()).wait())
        progress = asyncio.create_task(_report_progress(stats))
        try:
            await asyncio.wait([everyone, stopped], timeout=duration_s, return_when=asyncio.FIRST_COMPLETED)
            if everyone.done():
                everyone.result()  # a user that failed for good raises here
        finally:
            for task in (*tasks, stopped, progress):
                task.cancel()
            await asyncio.gather(*tasks, everyone, stopped, progress, return_exceptions=True)
    log.info("simulate done: %s", stats.summary())
    return stats


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.users`: simulated users chat with a running server and give feedback."""
    import argparse
    import json
    import signal
    from pathlib import Path

    from bench.preferences import load_prompts
    from service.settings import get_settings

    # unset flags keep UserConfig's defaults, so those are written in one place
    parser = argparse.ArgumentParser(prog="python -m bench.users", description=main.__doc__.split(": ", 1)[1],
                                     epilog="defaults: UserConfig in bench/users.py")
    parser.add_argument("--url", help="the server (default: http://127.0.0.1:CHATLOOP_PORT)")
    parser.add_argument("--preference", help="what the users like: vader (warm answers) or concise "
                        "(short answers that end properly)")
    parser.add_argument("--prompts", type=Path, help="prompt file, one a line (default: bench/prompts.txt); "
                        "train split")
    parser.add_argument("--users", type=int, help="users talking at once")
    parser.add_argument("--compare-fraction", type=float, help="share of turns that compare two answers")
    parser.add_argument("--noise", type=float, help="probability a vote is flipped")
    parser.add_argument("--threshold", type=float, help="thumb up when an answer scores above this")
    parser.add_argument("--max-tokens", type=int, help="answer length limit")
    parser.add_argument("--events", type=int, help="stop after this many feedback events")
    parser.add_argument("--duration", type=float, help="stop after this many seconds (neither: run until Ctrl-C)")
    parser.add_argument("--api-key", help="a chatloop key (default: none, anonymous; allowed on loopback)")
    parser.add_argument("--seed", type=int, help="the users' random seed")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for client in ("httpx", "httpx2"):  # feedback, chat (the openai client): a line per request buries progress
        logging.getLogger(client).setLevel(logging.WARNING)
    given = {"preference": args.preference, "compare_fraction": args.compare_fraction, "threshold": args.threshold,
             "noise": args.noise, "max_tokens": args.max_tokens, "concurrency": args.users, "seed": args.seed}
    config = UserConfig(**{name: value for name, value in given.items() if value is not None})
    try:
        get_preference(config.preference)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    prompts = load_prompts(args.prompts, "train")  # held-out prompts never get feedback
    if not prompts:
        raise SystemExit(f"no train-split prompts in {args.prompts}")
    url = args.url or f"http://127.0.0.1:{get_settings().port}"

    async def simulate() -> UserStats:
        stop = asyncio.Event()  # Ctrl-C ends the run cleanly, so the stats still print
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
        return await run_users(url, prompts, config, stop=stop, max_events=args.events, duration_s=args.duration,
                               api_key=args.api_key)

    try:
        stats = asyncio.run(simulate())
    except (openai.APIStatusError, httpx.HTTPStatusError) as exc:  # retrying cannot help: a bad key, say
        raise SystemExit(f"simulate stopped: {exc}") from None
    print(json.dumps(stats.as_dict(), indent=2))


if __name__ == "__main__":
    main()
