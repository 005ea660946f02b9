"""The offline sweep's simulated votes: what the loop's users would say about the same answers."""

from bench.offline_sweep import simulated_votes
from bench.users import UserConfig

ANSWERS = [
    ("warm?", ["meh", "lovely!", "great, thanks"], [0.0, 0.8, 0.9]),
    ("cold?", ["awful", "bad", "fine"], [-0.6, -0.5, 0.2]),
    ("same?", ["a", "b", "c"], [0.3, 0.3, 0.6]),
]


def test_votes_follow_the_preference_without_noise():
    data = simulated_votes(ANSWERS, UserConfig(noise=0.0, threshold=0.5))

    assert [(p.prompt[0]["content"], p.chosen, p.rejected) for p in data.pairs] == [
        ("warm?", "lovely!", "meh"), ("cold?", "bad", "awful"),  # the tie on "same?" gives no pair
    ]
    assert [(t.answer, t.label) for t in data.thumbs] == [("great, thanks", True), ("fine", False), ("c", True)]
    assert data.heldout_pairs == data.heldout_thumbs == []


def test_noise_flips_votes_and_limit_keeps_the_first():
    flipped = simulated_votes(ANSWERS, UserConfig(noise=1.0, threshold=0.5))
    assert [p.chosen for p in flipped.pairs] == ["meh", "awful"]
    assert [t.label for t in flipped.thumbs] == [False, True, False]

    first = simulated_votes(ANSWERS, UserConfig(noise=0.0), limit=3)
    assert [p.chosen for p in first.pairs] == ["lovely!", "bad"]  # in order: pair, thumb, pair
    assert [t.answer for t in first.thumbs] == ["great, thanks"]
