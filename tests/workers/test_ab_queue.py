"""A newer candidate and a test that leads: the test keeps its place and the newer candidate waits for its turn;
real Redis, the worker's enter_ab as the promote stage calls it and settle_ab + start_waiting as beat does."""

import asyncio

from redis.asyncio import Redis

from service.feedback.ab import ABTest
from service.store import ab_tests, registry, runs
from tests.workers.test_ab_gate import active, register, registry_call, settings_for, start, votes
from workers.tasks import enter_ab, settle_ab, start_waiting


def waiting(redis_url: str) -> ab_tests.Waiting | None:
    return registry_call(redis_url, ab_tests.waiting)()


def run(redis_url: str, run_id: str) -> dict:
    return runs.get_run(runs.client(settings_for(redis_url)), run_id)


def waiting_behind_a_leading_test(redis_url: str, tiny_adapter_dir, settings) -> tuple[ABTest, str]:
    """(the running test, leading at 0.67 on 3 votes of the 6 a verdict needs; the candidate of run2, waiting)."""
    test = asyncio.run(start(redis_url, tiny_adapter_dir))
    asyncio.run(votes(redis_url, test, [True, True, False]))
    newer = register(redis_url, tiny_adapter_dir)
    assert enter_ab(settings, newer, test.production, "run2") == "ab_waiting"
    return test, newer


def test_a_leading_test_keeps_its_place_and_the_newest_candidate_waits_its_turn(redis_url, redis_sync,
                                                                                 tiny_adapter_dir):
    settings = settings_for(redis_url)
    test, second = waiting_behind_a_leading_test(redis_url, tiny_adapter_dir, settings)
    assert asyncio.run(active(redis_url)).candidate == test.candidate  # the test goes on
    assert waiting(redis_url) == (second, test.production, "run2")
    assert enter_ab(settings, second, test.production, "run2") == "ab_waiting"  # a redelivered stage: no change

    third = register(redis_url, tiny_adapter_dir)  # the newest waits; the one it displaces will not be tested
    assert enter_ab(settings, third, test.production, "run3") == "ab_waiting"
    assert waiting(redis_url).candidate == third
    displaced = run(redis_url, "run2")
    assert displaced["status"] == "superseded" and "finished" in displaced
    assert displaced["ab"]["votes"] == 0 and f"superseded by {third} while it waited" in displaced["ab"]["reason"]

    for _ in range(3):  # more candidates than the registry keeps: the waiting one is kept all the same
        register(redis_url, tiny_adapter_dir)
    assert redis_sync.exists(registry.weights_key(third)) and not redis_sync.exists(registry.weights_key(second))

    asyncio.run(votes(redis_url, test, [True] * 8, voter="key:late"))  # the test's candidate wins
    assert settle_ab(settings)["status"] == "promoted" and start_waiting(settings) == "ab_test"
    running = asyncio.run(active(redis_url))
    # tested against the version promoted while it waited, under its own run, with a fresh deadline
    assert (running.candidate, running.production, running.run_id) == (third, test.candidate, "run3")
    assert running.started > test.started and run(redis_url, "run3")["status"] == "ab_test"
    assert waiting(redis_url) is None and start_waiting(settings) is None
    assert redis_sync.get(registry.PRODUCTION) == test.candidate


def test_a_test_that_does_not_lead_gives_way(redis_url, redis_sync, tiny_adapter_dir):
    settings = settings_for(redis_url)
    test = asyncio.run(start(redis_url, tiny_adapter_dir))
    asyncio.run(votes(redis_url, test, [True, False]))  # 0.5 so far: not above the default hold of 0.5
    newer = register(redis_url, tiny_adapter_dir)
    assert enter_ab(settings, newer, test.production, "run2") == "ab_test"
    assert asyncio.run(active(redis_url)).candidate == newer and run(redis_url, "run1")["status"] == "superseded"
    assert waiting(redis_url) is None


def test_a_hold_of_one_lets_every_newer_candidate_take_the_tests_place(redis_url, redis_sync, tiny_adapter_dir):
    settings = settings_for(redis_url, ab_hold_win_rate=1)
    test = asyncio.run(start(redis_url, tiny_adapter_dir))
    asyncio.run(votes(redis_url, test, [True] * 5))  # 1.0 so far, undecided (5 of 6 votes): still gives way
    newer = register(redis_url, tiny_adapter_dir)
    assert enter_ab(settings, newer, test.production, "run2") == "ab_test"
    assert run(redis_url, "run1")["status"] == "superseded"


def test_a_candidate_arriving_when_the_test_ends_goes_before_the_older_waiting_one(redis_url, redis_sync,
                                                                                   tiny_adapter_dir):
    settings = settings_for(redis_url)
    test, _ = waiting_behind_a_leading_test(redis_url, tiny_adapter_dir, settings)
    asyncio.run(votes(redis_url, test, [False] * 9, voter="key:late"))  # the users turn against it; nobody looked
    newest = register(redis_url, tiny_adapter_dir)
    assert enter_ab(settings, newest, test.production, "run3") == "ab_test"  # settles the test, then starts its own
    assert run(redis_url, "run1")["status"] == "rejected" and asyncio.run(active(redis_url)).candidate == newest
    assert run(redis_url, "run2")["status"] == "superseded" and waiting(redis_url) is None


def test_a_waiting_candidate_is_not_tested_after_an_operators_rollback(redis_url, redis_sync, tiny_adapter_dir):
    settings = settings_for(redis_url)
    waiting_behind_a_leading_test(redis_url, tiny_adapter_dir, settings)
    registry_call(redis_url, registry.rollback)()  # production goes back past the waiting candidate's parent
    assert settle_ab(settings)["cause"] == "production changed"
    assert start_waiting(settings) == "superseded" and asyncio.run(active(redis_url)) is None
    assert run(redis_url, "run2")["status"] == "superseded" and waiting(redis_url) is None


def test_the_waiting_slot_is_cleared_only_by_its_own_candidate(redis_url):
    async def go() -> None:
        client = Redis.from_url(redis_url, decode_responses=True)
        try:
            first, second = ab_tests.Waiting("v1", "base", "r1"), ab_tests.Waiting("v2", "base", "r2")
            assert await ab_tests.wait(client, first) is None
            assert await ab_tests.wait(client, first) is None  # the same entry again displaces nobody
            assert await ab_tests.wait(client, second) == first
            assert not await ab_tests.clear_waiting(client, "v1") and await ab_tests.waiting(client) == second
            assert await ab_tests.clear_waiting(client, "v2") and await ab_tests.waiting(client) is None
        finally:
            await client.aclose()

    asyncio.run(go())


def test_a_redelivered_stage_of_a_waiting_candidate_starts_its_test_without_superseding_it(redis_url, redis_sync,
                                                                                          tiny_adapter_dir):
    settings = settings_for(redis_url)
    test, newer = waiting_behind_a_leading_test(redis_url, tiny_adapter_dir, settings)
    asyncio.run(votes(redis_url, test, [False] * 9, voter="key:late"))
    assert settle_ab(settings)["status"] == "rejected"
    assert enter_ab(settings, newer, test.production, "run2") == "ab_test"  # the promote stage, delivered again
    assert asyncio.run(active(redis_url)).candidate == newer and waiting(redis_url) is None
    assert (run(redis_url, "run2") or {}).get("status") != "superseded"
