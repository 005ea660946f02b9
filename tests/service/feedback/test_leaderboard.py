import math

import pytest

from service.feedback.events import AnswerRef, FeedbackEvent
from service.feedback.leaderboard import arena_outcomes, bradley_terry, elo, leaderboard


def test_bradley_terry_matches_the_closed_form_for_two_players():
    # A beats B 3 times out of 4: the MLE has p_A / p_B = 3, an Elo gap of 400 log10 3 = 190.85.
    outcomes = [("A", "B", 1.0)] * 3 + [("A", "B", 0.0)]
    s = bradley_terry(outcomes, prior=0.0)
    assert s["A"] / s["B"] == pytest.approx(3.0, rel=1e-6)
    assert elo(s["A"]) - elo(s["B"]) == pytest.approx(400 * math.log10(3), abs=1e-3)


def test_ties_count_half_and_the_prior_keeps_unbeaten_versions_finite():
    assert bradley_terry([("A", "B", 0.5)] * 4, prior=0.0)["A"] == pytest.approx(1.0)
    s = bradley_terry([("A", "B", 1.0)] * 5)
    assert math.isfinite(s["A"]) and s["A"] > s["B"]


def test_leaderboard_orders_versions_and_brackets_ratings():
    outcomes = [("v2", "v1", 1.0)] * 30 + [("v2", "v1", 0.0)] * 10 + [("v1", "base", 1.0)] * 25 + \
        [("v1", "base", 0.0)] * 15
    rows = leaderboard(outcomes, bootstrap=50)
    assert [r["version"] for r in rows] == ["v2", "v1", "base"]
    for r in rows:
        assert r["ci95"][0] <= r["rating"] <= r["ci95"][1]
    assert rows[0]["votes"] == 40 and rows[0]["win_rate"] == 0.75


def event(adapters: list[str], voter: str = "u", completion: str = "c", blind: bool = True, **verdict) -> FeedbackEvent:
    answers = [AnswerRef(completion_id=completion, choice_index=i, adapter=a) for i, a in enumerate(adapters)]
    return FeedbackEvent(kind="comparison", created=1, voter=voter, prompt=[], conversation="x", answers=answers,
                         blind=blind, **verdict)


def test_arena_outcomes_from_comparison_events():
    events = [
        event(["v1", "v2"], preferred=1),
        event(["v1", "v1"], completion="d", preferred=0),  # same version twice: no information about versions
        event(["v1", "v2"], voter="w", verdict="tie"),
        event(["v1", "v2"], voter="z", preferred=0),
        event(["v1", "v2"], voter="z", preferred=1),  # z changed their mind: only the newest counts
        event(["v1", "v2"], voter="x", completion="e", blind=False, preferred=1),  # asked for by name: no count
    ]
    assert sorted(arena_outcomes(events)) == sorted([("v2", "v1", 1.0), ("v1", "v2", 0.5), ("v2", "v1", 1.0)])
