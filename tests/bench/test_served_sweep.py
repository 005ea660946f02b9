"""The served sweep's training batch: the loop's served answers, made from the same simulated votes."""

from bench.loop_eval import seed_summary
from bench.offline_sweep import simulated_votes
from bench.served_sweep import served_answers
from bench.users import UserConfig

ANSWERS = [
    ("warm?", ["meh", "lovely!", "great, thanks"], [0.0, 0.8, 0.9], [True, False, True]),
    ("cold?", ["awful", "bad", "fine"], [-0.6, -0.5, 0.2], [False, True, True]),
]
ENDED = {text: stop for _, texts, _, stops in ANSWERS for text, stop in zip(texts, stops, strict=True)}


def test_both_sides_of_a_comparison_and_each_thumb_carry_their_users_verdict():
    data = simulated_votes(ANSWERS, UserConfig(noise=0.0, threshold=0.5))
    served = served_answers(data, ENDED)
    assert [(s.prompt[0]["content"], s.text, s.ended, s.vote) for s in served] == [
        ("warm?", "lovely!", False, 1.0), ("warm?", "meh", True, -1.0),
        ("cold?", "bad", True, 1.0), ("cold?", "awful", False, -1.0),
        ("warm?", "great, thanks", True, 1.0), ("cold?", "fine", True, -1.0),  # thumbs: up above 0.5
    ]
    assert [s.text for s in served_answers(data, ENDED, thumbs=False)] == ["lovely!", "meh", "bad", "awful"]


def test_seed_summary_gives_each_variants_mean_over_its_training_runs_with_their_spread():
    gains = {"ppo, seed 0": (0.10, 2.0), "ppo, seed 1": (0.30, 4.0), "ppo, seed 2": (-0.10, 3.0),
             "dpo, seed 0": (0.05, 7.0)}
    seeds = {"ppo, seed 0": "ppo", "ppo, seed 1": "ppo", "ppo, seed 2": "ppo", "dpo, seed 0": "dpo"}
    rows = [line.split(" | ") for line in seed_summary(gains, seeds).splitlines()[2:]]
    # ppo: mean 0.1; sd = sqrt(((0)^2 + 0.2^2 + 0.2^2) / 2) = 0.2; its mean's standard error 0.2 / sqrt(3) = 0.115
    assert rows[0] == ["| ppo", "3", "+0.100, +0.300, -0.100", "+0.100 ± 0.115", "0.200", "3.0 |"]
    assert rows[1] == ["| dpo", "1", "+0.050", "+0.050 ± –", "–", "7.0 |"]  # one run: no spread to report
