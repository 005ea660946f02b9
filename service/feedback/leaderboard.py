"""Ratings of adapter versions from arena votes: Bradley-Terry strengths on an Elo scale, with
bootstrap confidence intervals, as Chatbot Arena rates models.

An outcome is (version a, version b, score of a): 1 a won, 0 b won, 0.5 a tie.
"""

import math
import random
from collections import defaultdict

from service.feedback.events import FeedbackEvent
from service.feedback.records import latest_votes

Outcome = tuple[str, str, float]


def arena_outcomes(events: list[FeedbackEvent]) -> list[Outcome]:
    """Blind comparisons (the arena's, an A/B test's) between answers of different versions, newest vote per voter
    and answer set. A comparison of versions the voter asked for by name does not count: they knew which was which."""
    outcomes = []
    for event in latest_votes(e for e in events if e.kind == "comparison" and e.blind):
        adapters = [a.adapter for a in event.answers]
        if len(set(adapters)) < 2:
            continue
        if event.verdict == "tie":
            outcomes += [(adapters[i], adapters[j], 0.5) for i in range(len(adapters))
                         for j in range(i + 1, len(adapters)) if adapters[i] != adapters[j]]
        outcomes += [(adapters[w], adapters[l_], 1.0) for w, l_ in event.pairs() if adapters[w] != adapters[l_]]
    return outcomes


def bradley_terry(outcomes: list[Outcome], prior: float = 0.5, iterations: int = 500) -> dict[str, float]:
    """Strengths p (mean log-strength 0) maximising prod p_a / (p_a + p_b) over won games (MM, Hunter 2004).

    `prior` adds that many virtual wins and losses against an average opponent, so a version that
    never lost (or never won) still gets a finite rating.
    """
    players = sorted({x for a, b, _ in outcomes for x in (a, b)})
    wins: dict[str, float] = defaultdict(float)
    games: dict[tuple[str, str], float] = defaultdict(float)
    for a, b, score in outcomes:
        wins[a] += score
        wins[b] += 1 - score
        games[a, b] += 1
        games[b, a] += 1
    strength = dict.fromkeys(players, 1.0)
    for _ in range(iterations):
        updated = {}
        for p in players:
            denominator = sum(n / (strength[p] + strength[q]) for (x, q), n in games.items() if x == p)
            denominator += 2 * prior / (strength[p] + 1.0)
            updated[p] = (wins[p] + prior) / denominator
        mean_log = sum(math.log(v) for v in updated.values()) / len(updated)
        strength = {p: v / math.exp(mean_log) for p, v in updated.items()}
    return strength


def elo(strength: float) -> float:
    return 1000 + 400 * math.log10(strength)


def leaderboard(outcomes: list[Outcome], bootstrap: int = 200, seed: int = 0) -> list[dict]:
    """Versions by rating, each with a 95% bootstrap interval, its votes and its win rate."""
    if not outcomes:
        return []
    point = bradley_terry(outcomes)
    rng = random.Random(seed)
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(bootstrap):
        resampled = [rng.choice(outcomes) for _ in outcomes]
        for version, s in bradley_terry(resampled, iterations=100).items():
            samples[version].append(elo(s))
    rows = []
    for version, s in point.items():
        played = [(score if a == version else 1 - score) for a, b, score in outcomes if version in (a, b)]
        draws = sorted(samples[version]) or [elo(s)]
        rows.append({
            "version": version, "rating": round(elo(s), 1),
            "ci95": [round(draws[int(0.025 * (len(draws) - 1))], 1), round(draws[int(0.975 * (len(draws) - 1))], 1)],
            "votes": len(played), "win_rate": round(sum(played) / len(played), 3),
        })
    return sorted(rows, key=lambda r: -r["rating"])
