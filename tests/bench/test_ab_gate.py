"""The A/B gate simulation drives the service's own decision rule: certain outcomes end at the first look allowed."""

import random

from bench.ab_gate import Thumbs, one_test
from service.feedback.ab import ABRules


def test_a_certain_winner_is_promoted_and_a_certain_loser_rejected_at_the_first_look_with_enough_votes():
    rules = ABRules(min_votes=40, max_votes_per_voter=50, bootstrap=200)
    # 25 votes a minute, a look a minute: 25 votes at minute 1 are too few, 50 at minute 2 decide
    assert one_test(1.0, 0.0, 25, rules, 60, 1200, random.Random(0)) == ("promote", 50, 2.0)
    assert one_test(0.0, 0.0, 25, rules, 60, 1200, random.Random(0)) == ("reject", 50, 2.0)


def test_ties_alone_never_decide_and_the_deadline_rejects():
    rules = ABRules(min_votes=40, max_votes_per_voter=50, bootstrap=200)
    assert one_test(0.5, 1.0, 25, rules, 60, 600, random.Random(0)) == ("deadline", 250, 10.0)


def test_with_a_futility_bound_ties_alone_end_the_test_at_the_first_look_with_enough_votes():
    rules = ABRules(min_votes=40, max_votes_per_voter=50, bootstrap=200, futility=0.55)
    assert one_test(0.5, 1.0, 25, rules, 60, 600, random.Random(0)) == ("futility", 50, 2.0)


def test_thumbs_alone_decide_a_clear_test_and_say_nothing_when_both_versions_are_alike():
    rules = ABRules(min_votes=40, max_votes_per_voter=50, bootstrap=200)
    loved = Thumbs(per_min=50, up=0.0, gap=2.0)  # the candidate's answers always up, production's never
    # 50 thumbs at minute 1 are worth about 25 comparisons, under the 40 a verdict needs; 100 at minute 2 decide
    assert one_test(1.0, 0.0, 0, rules, 60, 1200, random.Random(0), loved) == ("promote", 100, 2.0)
    assert one_test(0.0, 0.0, 0, rules, 60, 1200, random.Random(0), Thumbs(50, up=1.0, gap=2.0))[0] == "reject"
    alike = Thumbs(per_min=50, up=1.0)  # every thumb up on both: no difference, only the deadline ends it
    assert one_test(0.5, 0.0, 0, rules, 60, 600, random.Random(0), alike) == ("deadline", 500, 10.0)
