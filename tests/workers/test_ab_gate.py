"""A candidate that passed the offline checks waits in a blind A/B test until the users' votes (or the deadline)
settle it; real Redis, the worker's settle_ab as beat calls it."""

import asyncio
import time

from redis.asyncio import Redis

from common.models import BASE
from service.feedback.ab import ABTest, Evidence, decide
from service.feedback.events import AnswerRef, FeedbackEvent
from service.settings import Settings
from service.store import ab_tests, feedback_store, redis_keys, registry, runs
from workers.celery_app import CONTROL, app
from workers.tasks import ab_rules, end_ab, enter_ab, settle_ab


def settings_for(redis_url: str, **overrides) -> Settings:
    return Settings(**{"redis_url": redis_url, "ab_min_votes": 6, "ab_max_votes_per_voter": 100, **overrides})


async def start(redis_url: str, adapter_dir, deadline_s: float = 3600) -> ABTest:
    client = Redis.from_url(redis_url, decode_responses=True)
    production = await registry.register_dir(client, adapter_dir)
    candidate = await registry.register_dir(client, adapter_dir)
    await registry.promote(client, production)
    test = ABTest(candidate=candidate, production=production, run_id="run1", started=time.time() - 1,
                  deadline=time.time() + deadline_s)
    assert await ab_tests.start(client, test)
    assert not await ab_tests.start(client, test)  # one test at a time
    await client.aclose()
    runs.update_run(runs.client(settings_for(redis_url)), "run1", id="run1", status="ab_test", candidate=candidate)
    return test


async def votes(redis_url: str, test: ABTest, wins: list[bool], blind: bool = True, voter: str | None = None) -> None:
    client = Redis.from_url(redis_url, decode_responses=True)
    for i, candidate_won in enumerate(wins):
        completion = f"chatcmpl-{voter}-{i}-{blind}"
        await client.set(redis_keys.completion(completion), "{}")
        pair = [test.production, test.candidate] if i % 2 else [test.candidate, test.production]  # blind: any order
        answers = [AnswerRef(completion_id=completion, choice_index=k, adapter=v) for k, v in enumerate(pair)]
        await feedback_store.cast_vote(client, FeedbackEvent(
            kind="comparison", created=1, voter=voter or f"key:u{i}", prompt=[], conversation="c", answers=answers,
            preferred=pair.index(test.candidate if candidate_won else test.production), blind=blind,
        ))
    await client.aclose()


async def active(redis_url: str) -> ABTest | None:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        return await ab_tests.active(client)
    finally:
        await client.aclose()


def status(redis_url: str) -> str:
    return runs.get_run(runs.client(settings_for(redis_url)), "run1")["status"]


def test_a_candidate_the_users_prefer_is_promoted(redis_url, redis_sync, tiny_adapter_dir):
    settings = settings_for(redis_url)
    test = asyncio.run(start(redis_url, tiny_adapter_dir))
    asyncio.run(votes(redis_url, test, [True] * 5))
    assert settle_ab(settings)["status"] == "ab_test"  # 5 votes of the 6 needed before any verdict
    asyncio.run(votes(redis_url, test, [True] * 20, blind=False, voter="key:named"))  # asked for by name: no count
    assert settle_ab(settings)["votes"] == 5
    asyncio.run(votes(redis_url, test, [True] * 5 + [False], voter="key:late"))
    verdict = settle_ab(settings)
    assert verdict["status"] == "promoted" and verdict["votes"] == 11 and verdict["ci95"][0] > 0.5
    assert verdict["cause"] == "evidence" and runs.get_run(runs.client(settings), "run1")["ab"]["cause"] == "evidence"
    assert redis_sync.get(registry.PRODUCTION) == test.candidate
    assert status(redis_url) == "promoted" and redis_sync.get(ab_tests.ACTIVE) is None
    assert settle_ab(settings) is None  # nothing left to decide


def test_a_candidate_the_users_reject_is_rejected_and_production_stays(redis_url, redis_sync, tiny_adapter_dir):
    settings = settings_for(redis_url)
    test = asyncio.run(start(redis_url, tiny_adapter_dir))
    asyncio.run(votes(redis_url, test, [False] * 9 + [True]))
    verdict = settle_ab(settings)
    assert (verdict["status"], verdict["cause"]) == ("rejected", "evidence")
    assert redis_sync.get(registry.PRODUCTION) == test.production and status(redis_url) == "rejected"


def test_one_voter_cannot_vote_a_candidate_in(redis_url, redis_sync, tiny_adapter_dir):
    settings = settings_for(redis_url, ab_max_votes_per_voter=2)
    test = asyncio.run(start(redis_url, tiny_adapter_dir))
    asyncio.run(votes(redis_url, test, [True] * 30, voter="key:eager"))
    verdict = settle_ab(settings)
    assert verdict["status"] == "ab_test" and verdict["votes"] == 2  # 30 votes, 2 of them count: under 6
    assert redis_sync.get(registry.PRODUCTION) == test.production


def test_the_deadline_decides_an_undecided_test(redis_url, redis_sync, tiny_adapter_dir):
    settings = settings_for(redis_url)
    test = asyncio.run(start(redis_url, tiny_adapter_dir, deadline_s=-1))
    asyncio.run(votes(redis_url, test, [True, False] * 4))  # 8 votes, even: undecided
    verdict = settle_ab(settings)
    assert (verdict["status"], verdict["cause"]) == ("rejected", "deadline")
    assert redis_sync.get(registry.PRODUCTION) == test.production


def test_a_quiet_deployment_falls_back_to_the_offline_checks(redis_url, redis_sync, tiny_adapter_dir):
    settings = settings_for(redis_url)
    test = asyncio.run(start(redis_url, tiny_adapter_dir, deadline_s=-1))
    asyncio.run(votes(redis_url, test, [False, True]))  # 2 votes by the deadline: too few to tell
    verdict = settle_ab(settings)
    assert (verdict["status"], verdict["cause"]) == ("promoted", "quiet")
    assert redis_sync.get(registry.PRODUCTION) == test.candidate


def test_a_rollback_during_the_test_wins(redis_url, redis_sync, tiny_adapter_dir):
    settings = settings_for(redis_url)
    test = asyncio.run(start(redis_url, tiny_adapter_dir))
    asyncio.run(votes(redis_url, test, [True] * 10))

    async def operator_rolls_back() -> None:
        client = Redis.from_url(redis_url, decode_responses=True)
        await registry.rollback(client)
        await client.aclose()

    asyncio.run(operator_rolls_back())
    verdict = settle_ab(settings)  # production is not what the candidate was tested against
    assert (verdict["status"], verdict["cause"]) == ("rejected", "production changed")
    assert redis_sync.get(registry.PRODUCTION) != test.candidate


def registry_call(redis_url: str, fn):
    """A registry coroutine function as a plain call on a client of its own."""

    def call(*args):
        async def run():
            client = Redis.from_url(redis_url, decode_responses=True)
            try:
                return await fn(client, *args)
            finally:
                await client.aclose()

        return asyncio.run(run())

    return call


def register(redis_url: str, adapter_dir) -> str:
    return registry_call(redis_url, registry.register_dir)(adapter_dir)


def test_a_newer_candidate_supersedes_an_undecided_test(redis_url, redis_sync, tiny_adapter_dir):
    settings = settings_for(redis_url)
    test = asyncio.run(start(redis_url, tiny_adapter_dir))
    asyncio.run(votes(redis_url, test, [False, True, False]))  # too few to decide, and it does not lead
    newer = register(redis_url, tiny_adapter_dir)
    assert enter_ab(settings, newer, test.production, "run2") == "ab_test"
    running = asyncio.run(active(redis_url))
    assert running.candidate == newer and running.production == test.production and running.run_id == "run2"
    old = runs.get_run(runs.client(settings), "run1")
    assert old["status"] == "superseded" and old["ab"]["votes"] == 3 and "superseded by" in old["ab"]["reason"]
    assert old["ab"]["cause"] == "superseded"
    assert redis_sync.get(registry.PRODUCTION) == test.production
    assert enter_ab(settings, newer, test.production, "run2") == "ab_test"  # a redelivered stage changes nothing
    assert asyncio.run(active(redis_url)).started == running.started


def test_a_test_the_evidence_decides_is_decided_before_a_newer_candidate_arrives(redis_url, redis_sync,
                                                                                    tiny_adapter_dir):
    settings = settings_for(redis_url)
    test = asyncio.run(start(redis_url, tiny_adapter_dir))
    asyncio.run(votes(redis_url, test, [True] * 12))
    newer = register(redis_url, tiny_adapter_dir)
    # The running candidate wins first; the newer one, trained from the old production on more feedback, is then
    # tested against the winner.
    assert enter_ab(settings, newer, test.production, "run2") == "ab_test"
    assert redis_sync.get(registry.PRODUCTION) == test.candidate and status(redis_url) == "promoted"
    running = asyncio.run(active(redis_url))
    assert running.candidate == newer and running.production == test.candidate and running.run_id == "run2"


def test_a_candidate_whose_parent_an_operator_rolled_back_to_is_not_tested(redis_url, redis_sync,
                                                                         tiny_adapter_dir):
    """Promoted while the newer candidate trained, then rolled back by an operator: production was taken back on
    purpose, so a candidate trained before it is not put in front of the users."""
    settings = settings_for(redis_url)
    first, second = register(redis_url, tiny_adapter_dir), register(redis_url, tiny_adapter_dir)
    promote = registry_call(redis_url, registry.promote)
    promote(first)
    promote(second)  # the newer candidate trains from `first`...
    registry_call(redis_url, registry.rollback)()  # ...and production goes back to `first`
    assert enter_ab(settings, register(redis_url, tiny_adapter_dir), second, "run2") == "superseded"
    assert asyncio.run(active(redis_url)) is None
    # one trained from `first` itself is tested as usual
    newer = register(redis_url, tiny_adapter_dir)
    assert enter_ab(settings, newer, first, "run3") == "ab_test" and asyncio.run(active(redis_url)).candidate == newer


def test_promoted_since_follows_promotions_and_stops_at_a_rollback(redis_url, tiny_adapter_dir):
    first, second = register(redis_url, tiny_adapter_dir), register(redis_url, tiny_adapter_dir)
    promote, since = registry_call(redis_url, registry.promote), registry_call(redis_url, registry.promoted_since)
    before = registry_call(redis_url, registry.production)()  # what earlier tests on this server left
    assert since(BASE, BASE) and not since(first, second)  # first was never production
    promote(first)
    promote(second)
    assert since(before, second) and since(first, second) and not since(second, first)
    registry_call(redis_url, registry.rollback)()  # production: first again
    assert since(first, first) and not since(second, first) and not since(before, first)


def test_a_candidate_after_a_rejected_test_gets_its_own(redis_url, redis_sync, tiny_adapter_dir):
    settings = settings_for(redis_url)
    test = asyncio.run(start(redis_url, tiny_adapter_dir))
    asyncio.run(votes(redis_url, test, [False] * 12))
    newer = register(redis_url, tiny_adapter_dir)
    assert enter_ab(settings, newer, test.production, "run2") == "ab_test"
    assert status(redis_url) == "rejected" and asyncio.run(active(redis_url)).candidate == newer


def test_a_test_that_gave_way_meanwhile_is_not_carried_out_twice(redis_url, redis_sync, tiny_adapter_dir):
    """Beat's check and a promote stage may settle the same test at once: the one that ends it carries out the
    verdict; the other, having read a test that has since given way to a newer candidate, changes nothing."""
    test = asyncio.run(start(redis_url, tiny_adapter_dir))
    asyncio.run(votes(redis_url, test, [True] * 12))  # the evidence says promote

    async def replaced_then_settled() -> str | None:
        client = Redis.from_url(redis_url, decode_responses=True)
        newer = ABTest(candidate=await registry.register_dir(client, tiny_adapter_dir), production=test.production,
                       run_id="run2", started=time.time(), deadline=time.time() + 3600)
        assert await ab_tests.replace(client, test.candidate, newer)
        try:
            return await end_ab(client, test, True, "stale read")  # what the slower settler would do now
        finally:
            await client.aclose()

    assert asyncio.run(replaced_then_settled()) is None
    assert redis_sync.get(registry.PRODUCTION) == test.production  # the stale verdict promoted nothing
    assert asyncio.run(active(redis_url)).run_id == "run2"  # and ended nobody's test


def test_beats_check_has_a_queue_of_its_own():
    """Training workers consume the default queue; beat's process consumes CONTROL, so settling an A/B test never
    waits behind a training stage."""
    router = app.amqp.router
    assert router.route({}, "chatloop.maybe_retrain")["queue"].name == CONTROL
    for stage in ("chatloop.train_reward", "chatloop.train_policy", "chatloop.evaluate", "chatloop.promote"):
        assert router.route({}, stage)["queue"].name == app.conf.task_default_queue != CONTROL


def test_the_interval_level_setting_reaches_the_workers_rule(redis_url):
    """27 wins in 40 votes: the 95 % interval's lower bound is above 1/2 (~0.53), the 99 % one's below (~0.48)."""
    test = ABTest(candidate="c", production="p", run_id="r", started=0, deadline=3600)
    scores = Evidence([1.0] * 27 + [0.0] * 13)
    assert decide(scores, test, 1, ab_rules(settings_for(redis_url)))[0] == "promote"
    assert decide(scores, test, 1, ab_rules(settings_for(redis_url, ab_confidence=0.99)))[0] == "wait"


def test_the_futility_setting_reaches_the_workers_rule(redis_url):
    """0.5 of 400 votes: the interval (~[0.45, 0.55]) rules out 0.6 but not 0.55."""
    test = ABTest(candidate="c", production="p", run_id="r", started=0, deadline=3600)
    even = Evidence([1.0, 0.0] * 200)
    assert decide(even, test, 1, ab_rules(settings_for(redis_url, ab_futility=0.6)))[:2] == ("reject", "futility")
    assert decide(even, test, 1, ab_rules(settings_for(redis_url, ab_futility=0.5))).verdict == "wait"
