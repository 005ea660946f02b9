"""The A/B test's rules by hand: which votes count, the pooled win rate and its bootstrap interval, each verdict."""

import numpy as np
import pytest

from service.feedback.ab import ABRules, ABTest, Evidence, decide, outcomes, pooled_win_rate, win_rate_interval
from service.feedback.events import AnswerRef, FeedbackEvent

TEST = ABTest(candidate="v2", production="v1", run_id="r", started=0.0, deadline=100.0)
RULES = ABRules(min_votes=10, max_votes_per_voter=3)


def vote(first: str, second: str, voter: str = "key:a", cid: str = "c1", blind: bool = True, **verdict):
    answers = [AnswerRef(completion_id=cid, choice_index=0, adapter=first),
               AnswerRef(completion_id=cid, choice_index=1, adapter=second)]
    return FeedbackEvent(kind="comparison", created=1, voter=voter, prompt=[], conversation="c", answers=answers,
                         blind=blind, **verdict)


def test_only_blind_votes_on_the_pair_count_and_ties_are_halves():
    events = [
        vote("v1", "v2", preferred=1),  # candidate wins
        vote("v2", "v1", cid="c2", preferred=1),  # production wins
        vote("v1", "v2", cid="c3", verdict="tie"),
        vote("v1", "v2", cid="c4", verdict="both_bad"),  # says nothing about which is better
        vote("v1", "v2", cid="c5", blind=False, preferred=1),  # the voter asked for these versions by name
        vote("v1", "v0", cid="c6", preferred=1),  # another pair
        vote("v2", "v1", cid="c7", ranking=[0, 1]),  # a ranking: candidate first
    ]
    assert outcomes(events, TEST, max_votes_per_voter=100) == Evidence(comparisons=[1.0, 0.0, 0.5, 1.0])


def test_a_revote_replaces_and_one_voter_counts_at_most_the_cap():
    events = [vote("v1", "v2", preferred=0), vote("v1", "v2", preferred=1)]  # changed their mind
    assert outcomes(events, TEST, max_votes_per_voter=100).comparisons == [1.0]
    flood = [vote("v1", "v2", cid=f"c{i}", preferred=1) for i in range(20)]
    assert outcomes([*flood, vote("v1", "v2", voter="key:b", preferred=0)], TEST, max_votes_per_voter=3).comparisons \
        == [1.0, 1.0, 1.0, 0.0]


def thumb(adapter: str, up: bool, voter: str = "key:a", cid: str = "t1", blind: bool = True):
    return FeedbackEvent(kind="thumb", created=1, voter=voter, prompt=[], conversation="c", blind=blind,
                         answers=[AnswerRef(completion_id=cid, adapter=adapter)], rating=1 if up else -1)


def test_blind_thumbs_on_either_version_count_for_it_and_share_the_voter_cap():
    events = [
        thumb("v2", True), thumb("v2", False, cid="t2"), thumb("v1", True, cid="t3"),
        thumb("v0", True, cid="t4"),  # another version
        thumb("v2", True, cid="t5", blind=False),  # asked for by name
        thumb("v1", False, cid="t3"),  # changed their mind about t3
    ]
    assert outcomes(events, TEST, max_votes_per_voter=100) == Evidence(candidate_thumbs=[1.0, 0.0],
                                                                       production_thumbs=[0.0])
    mixed = [vote("v1", "v2", preferred=1), thumb("v2", True), thumb("v1", True, cid="t2")]
    assert outcomes(mixed, TEST, max_votes_per_voter=2) == Evidence(comparisons=[1.0], candidate_thumbs=[1.0])


def test_the_pooled_win_rate_by_hand():
    # comparisons 3 of 4 won: p = 0.75. Thumbs up 3/4 on the candidate, 1/4 on production: q = 1/2 + (3/4 - 1/4)/2
    # = 0.75 as well; even shares, so the effective number is 4 * 4 * 4 / 8 = 8 thumbs, weighing 0.5: 4
    comparisons, up_c, up_p = [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]
    assert win_rate_interval(Evidence(comparisons, up_c, up_p), bootstrap=10)[0] == pytest.approx(0.75)
    # production liked as much as the candidate: q = 1/2, pooled (4 * 0.75 + 4 * 0.5) / 8
    assert win_rate_interval(Evidence(comparisons, up_c, up_c), bootstrap=10)[0] == pytest.approx(0.625)
    # 8 thumbs on the candidate and 2 on production: effective 4 * 8 * 2 / 10 = 6.4, weight 3.2
    assert pooled_win_rate(np.float64(0.75), np.float64(1.0), np.float64(0.0), (4.0, 3.2)) == pytest.approx(
        (4 * 0.75 + 3.2) / 7.2)
    assert win_rate_interval(Evidence(comparisons, [1.0] * 8, [0.0, 0.0]), bootstrap=10)[0] == pytest.approx(
        (4 * 0.75 + 3.2 * 1.0) / 7.2)
    # thumbs on one version only say nothing about the difference
    assert win_rate_interval(Evidence(candidate_thumbs=[1.0] * 30)) == (0.5, 0.0, 1.0)


def test_the_interval_of_a_constant_is_that_constant_and_widens_with_fewer_votes():
    assert win_rate_interval(Evidence([1.0] * 20)) == (1.0, 1.0, 1.0)
    mean, low, high = win_rate_interval(Evidence([1.0, 0.0] * 50))
    assert mean == 0.5 and low < 0.5 < high
    # 100 votes at 1/2: the standard error is 0.05, so the 95 % interval is about +-0.1
    assert 0.38 < low < 0.42 and 0.58 < high < 0.62
    _, low_few, high_few = win_rate_interval(Evidence([1.0, 0.0] * 5))
    assert low_few < low and high_few > high


def test_thumbs_narrow_the_interval():
    """100 comparisons at 1/2 and 100 thumbs on each version, up at 1/2 on both: the pooled rate's standard error
    weighs 100 each way (the thumbs: 0.5 * 4 * 100 * 100 / 200), so its standard error is
    sqrt(100^2 * 0.25 / 100 + 100^2 * (0.25 / 100 + 0.25 / 100) / 4) / 200 = sqrt(25 + 12.5) / 200 = 0.031, against
    0.05 for the comparisons alone: the 95 % interval is about +-0.06."""
    _, low, high = win_rate_interval(Evidence([1.0, 0.0] * 50, [1.0, 0.0] * 50, [1.0, 0.0] * 50))
    assert 0.43 < low < 0.45 and 0.55 < high < 0.57


@pytest.mark.parametrize(
    ("scores", "now", "verdict"),
    [
        ([1.0] * 9 + [0.0], 50.0, "promote"),  # 10 votes, 0.9: the interval is above 1/2
        ([0.0] * 9 + [1.0], 50.0, "reject"),
        ([1.0] * 9, 50.0, "wait"),  # clear, but under min_votes
        ([1.0, 0.0] * 10, 50.0, "wait"),  # undecided before the deadline
        ([1.0, 0.0] * 10, 100.0, "reject"),  # undecided at the deadline with enough votes
        ([1.0, 0.0], 100.0, "promote"),  # a quiet deployment: the offline checks decide
    ],
)
def test_verdicts(scores, now, verdict):
    assert decide(Evidence(scores), TEST, now, RULES)[0] == verdict


def test_thumbs_alone_can_decide():
    liked = Evidence(candidate_thumbs=[1.0] * 9 + [0.0], production_thumbs=[0.0] * 9 + [1.0])  # q = 0.9
    verdict, _, reason = decide(liked, TEST, 50.0, RULES)
    assert verdict == "promote" and "0 comparisons, 10 + 10 thumbs" in reason
    assert decide(Evidence(candidate_thumbs=liked.production_thumbs, production_thumbs=liked.candidate_thumbs),
                  TEST, 50.0, RULES)[0] == "reject"
    # 16 thumbs are worth 8 comparisons, under the 10 a verdict needs, however clear they are
    assert decide(Evidence(candidate_thumbs=[1.0] * 8, production_thumbs=[0.0] * 8), TEST, 50.0, RULES)[0] == "wait"


FUTILE = ABRules(min_votes=10, max_votes_per_voter=3, futility=0.55)


@pytest.mark.parametrize(
    ("scores", "verdict", "cause"),
    [
        ([0.5] * 40, "reject", "futility"),  # every vote a tie: the interval is [0.5, 0.5], below 0.55
        ([0.5] * 9, "wait", "pending"),  # the same under min_votes: no verdict yet
        ([1.0, 0.0] * 20, "wait", "pending"),  # 0.5 of 40: the upper bound (~0.65) still allows a gain worth having
        # 0.52 of 5,000: the interval (~[0.506, 0.534]) rules out 0.55 but is above 1/2: a proven gain, however
        # small, is promoted
        (([1.0] * 52 + [0.0] * 48) * 50, "promote", "evidence"),
        ([0.0] * 9 + [1.0], "reject", "evidence"),  # users prefer production: that ground comes first
    ],
)
def test_the_futility_bound_rejects_a_test_that_rules_out_a_worthwhile_gain(scores, verdict, cause):
    decision = decide(Evidence(scores), TEST, 50.0, FUTILE)
    assert (decision.verdict, decision.cause) == (verdict, cause)
    assert decide(Evidence(scores), TEST, 50.0, RULES).cause != "futility"  # 1/2: off


def test_the_deadline_says_why():
    assert decide(Evidence([1.0, 0.0] * 10), TEST, 100.0, FUTILE)[:2] == ("reject", "deadline")
    assert decide(Evidence([1.0, 0.0]), TEST, 100.0, FUTILE)[:2] == ("promote", "quiet")
