"""The online A/B test that decides a candidate's promotion: evidence from the users, not from the reward model.

A candidate that passed the offline checks answers a share of the comparison traffic: such a request gets one
answer from production and one from the candidate, in random order, and nobody is told which is which. Each
vote on such a pair is one outcome for the candidate: 1 if its answer was preferred, 0 if production's was,
1/2 for a tie. The candidate is promoted when the 95 % bootstrap lower bound of its win rate is above 1/2,
rejected when the upper bound is below 1/2 or the deadline passes with enough votes and neither happened; with
fewer than `min_votes` by the deadline (a quiet deployment), the offline checks decide alone.

Only blind votes count (answers served without their versions), only the newest vote of each voter on each
pair, and at most `max_votes_per_voter` from any one voter, so that no single caller can vote a candidate in.
"""

import random
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Literal

from service.feedback.events import FeedbackEvent
from service.feedback.records import latest_votes

Verdict = Literal["promote", "reject", "wait"]


@dataclass(frozen=True)
class ABTest:
    candidate: str
    production: str  # the version the candidate is compared with (and must still be production to be promoted)
    run_id: str
    started: float
    deadline: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ABTest":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ABRules:
    """How a test is decided; the service's values come from its settings (CHATLOOP_AB_*)."""

    min_votes: int  # fewer by the deadline: the offline checks decide alone; and no verdict before this many
    max_votes_per_voter: int
    confidence: float = 0.95
    bootstrap: int = 2000
    seed: int = 0


def outcomes(events: list[FeedbackEvent], test: ABTest, max_votes_per_voter: int) -> list[float]:
    """The candidate's score in each counted vote (1 win, 0 loss, 0.5 tie), oldest first."""
    pair = {test.candidate, test.production}
    per_voter: dict[str, int] = defaultdict(int)
    scores = []
    for event in latest_votes(e for e in events if e.kind == "comparison" and e.blind):
        adapters = [a.adapter for a in event.answers]
        if len(adapters) != 2 or set(adapters) != pair or per_voter[event.voter] >= max_votes_per_voter:
            continue
        if event.verdict == "tie":
            score = 0.5
        elif event.preferred is not None or event.ranking is not None:
            winner = event.preferred if event.preferred is not None else event.ranking[0]
            score = 1.0 if adapters[winner] == test.candidate else 0.0
        else:  # "both bad" says nothing about which is better
            continue
        per_voter[event.voter] += 1
        scores.append(score)
    return scores


def win_rate_interval(scores: list[float], confidence: float = 0.95, bootstrap: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """(mean, lower, upper): the win rate and its percentile bootstrap interval."""
    if not scores:
        return 0.5, 0.0, 1.0
    rng = random.Random(seed)
    n = len(scores)
    means = sorted(sum(rng.choices(scores, k=n)) / n for _ in range(bootstrap))
    tail = (1 - confidence) / 2
    return sum(scores) / n, means[int(tail * (bootstrap - 1))], means[int((1 - tail) * (bootstrap - 1))]


def decide(scores: list[float], test: ABTest, now: float, rules: ABRules) -> tuple[Verdict, str]:
    """The verdict on the candidate so far, and why."""
    mean, lower, upper = win_rate_interval(scores, rules.confidence, rules.bootstrap, rules.seed)
    summary = f"win rate {mean:.3f} [{lower:.3f}, {upper:.3f}] over {len(scores)} votes"
    if len(scores) >= rules.min_votes:
        if lower > 0.5:
            return "promote", f"users prefer it: {summary}"
        if upper < 0.5:
            return "reject", f"users prefer production: {summary}"
    if now < test.deadline:
        return "wait", summary
    if len(scores) < rules.min_votes:
        return "promote", f"deadline passed with too few votes to tell ({summary}); the offline checks decide"
    return "reject", f"deadline passed without evidence that users prefer it: {summary}"
