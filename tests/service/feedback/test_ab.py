"""The A/B test's rules by hand: which votes count, the bootstrap interval, and each verdict."""

import pytest

from service.feedback.ab import ABRules, ABTest, decide, outcomes, win_rate_interval
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
    assert outcomes(events, TEST, max_votes_per_voter=100) == [1.0, 0.0, 0.5, 1.0]


def test_a_revote_replaces_and_one_voter_counts_at_most_the_cap():
    events = [vote("v1", "v2", preferred=0), vote("v1", "v2", preferred=1)]  # changed their mind
    assert outcomes(events, TEST, max_votes_per_voter=100) == [1.0]
    flood = [vote("v1", "v2", cid=f"c{i}", preferred=1) for i in range(20)]
    assert outcomes([*flood, vote("v1", "v2", voter="key:b", preferred=0)], TEST, max_votes_per_voter=3) == [
        1.0, 1.0, 1.0, 0.0]


def test_the_interval_of_a_constant_is_that_constant_and_widens_with_fewer_votes():
    assert win_rate_interval([1.0] * 20) == (1.0, 1.0, 1.0)
    mean, low, high = win_rate_interval([1.0, 0.0] * 50)
    assert mean == 0.5 and low < 0.5 < high
    # 100 votes at 1/2: the standard error is 0.05, so the 95 % interval is about +-0.1
    assert 0.38 < low < 0.42 and 0.58 < high < 0.62
    _, low_few, high_few = win_rate_interval([1.0, 0.0] * 5)
    assert low_few < low and high_few > high


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
    assert decide(scores, TEST, now, RULES)[0] == verdict
