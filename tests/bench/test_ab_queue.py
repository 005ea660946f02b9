"""The candidate-stream simulation follows enter_ab's rule: without a hold every newer candidate takes an undecided
test's place; with one a leading test keeps it and the newest candidate waits, then gets its turn."""

import random

import pytest

from bench.ab_gate import Thumbs
from bench.ab_queue import Stream, one_deployment
from service.feedback.ab import ABRules

SURE = Stream(every=1, gain=0.45, spread=0.0, votes_per_min=25, ties=0.0, thumbs=Thumbs())  # p = 0.95 vs its parent


def rules(**kw) -> ABRules:
    return ABRules(**{"min_votes": 40, "max_votes_per_voter": 10**6, "bootstrap": 200, **kw})


def test_without_a_hold_each_newer_candidate_takes_an_undecided_tests_place():
    d = one_deployment(SURE, rules(min_votes=10**6, hold=1.0), 5, 60, 10**6, random.Random(0))
    assert d.counts["gave way"] == 4 and d.counts["decided"] == d.counts["waited"] == 0
    assert d.test[0].candidate == "v5" and d.production == "base"


def test_with_a_hold_a_leading_test_keeps_its_place_and_only_the_newest_candidate_waits():
    d = one_deployment(SURE, rules(min_votes=10**6, hold=0.5), 5, 60, 10**6, random.Random(0))
    assert d.counts["gave way"] == 0 and (d.counts["waited"], d.counts["displaced"]) == (4, 3)
    assert d.test[0].candidate == "v1" and d.waiting == "v5"


def test_the_waiting_candidate_is_tested_against_the_version_promoted_meanwhile():
    # v1 is tested from minute 1 and promoted at minute 3 (50 votes); v2, trained from the base, waited and is then
    # tested against v1 (as good as it: no lead), so v3, arriving at that look, takes its place
    d = one_deployment(SURE, rules(hold=0.5), 3, 60, 10**6, random.Random(0))
    assert d.productions == [(0.0, "base"), (3.0, "v1")] and d.counts["promoted"] == 1
    assert d.counts["waited"] == 1 and d.counts["gave way"] == 1 and d.waiting is None
    test, voters = d.test
    assert (test.candidate, test.production) == ("v3", "v1") and voters.win == pytest.approx(0.5)  # v3 = v1
    assert d.quality["v2"] == d.quality["v1"] == 0.45
