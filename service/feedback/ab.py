"""The online A/B test that decides a candidate's promotion: evidence from the users, not from the reward model.

A candidate that passed the offline checks answers a share of production's traffic, blind: a comparison request
gets one answer from production and one from the candidate, in random order; a single-answer request gets one
answer from either, at even odds. Nobody is told which version wrote what. The evidence is of two kinds:

- a vote on such a pair is one outcome for the candidate: 1 if its answer was preferred, 0 if production's was,
  1/2 for a tie; their mean p is its win rate;
- a thumb on such an answer is 1 (up) or 0 (down), and the two versions' thumbs-up rates u_c and u_p give
  q = 1/2 + (u_c - u_p) / 2, the chance that a thumb on a candidate answer beats one on a production answer, ties
  counting half: a win rate too, 1/2 when the users like the two alike.

The test's win rate pools them, (n_c p + w n_t q) / (n_c + w n_t), with n_c comparisons, n_t thumbs (an
effective number, fewer when one version got most of them) and w = `thumb_weight`: a thumb judges one answer
without a reference, so it moves q half as far as a vote moves p and counts half (as in the reward model). Thumbs
are half of a chat service's feedback or more, so they shorten the test where they are. The interval is a
stratified percentile bootstrap (each kind resampled on its own). The candidate is promoted when the interval's
lower bound is above 1/2, rejected when its upper bound is below 1/2 (the users prefer production), when its upper
bound is below `futility` (whatever the users' preference, it is too slight to be worth the test: the test ends
and its users get production's answers again, instead of waiting out the deadline), or when the deadline passes
with enough votes and none of that happened; with fewer than `min_votes` by the deadline (a quiet deployment), the
offline checks decide alone.
The minimum counts a thumb as the weight it has in the pooled rate: without that, the thumbs brought the first
look, the noisiest, a minute earlier and raised the false promotions in bench/ab_gate.py.

Only blind votes count (answers served without their versions), only the newest vote of each voter on each
answer, and at most `max_votes_per_voter` from any one voter, so that no single caller can vote a candidate in.
"""

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Literal, NamedTuple

import numpy as np

from service.feedback.events import FeedbackEvent
from service.feedback.records import latest_votes

Verdict = Literal["promote", "reject", "wait"]
# Why: the interval cleared 1/2 ("evidence"), excluded a worthwhile gain ("futility"), the deadline passed with
# enough votes ("deadline") or with too few to tell ("quiet"); "pending": no verdict yet
Cause = Literal["evidence", "futility", "deadline", "quiet", "pending"]


class Decision(NamedTuple):
    verdict: Verdict
    cause: Cause
    reason: str  # for people: the verdict's grounds and the evidence


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

    # Fewer by the deadline: the offline checks decide alone; and no verdict before this many. Counted in
    # comparisons' worth: a thumb counts thumb_weight (of the effective number, _weights)
    min_votes: int
    max_votes_per_voter: int
    confidence: float = 0.95
    # Rejected when the interval's upper bound is below this: the gain is too slight to be worth the test (1/2: off,
    # as here; the service's is CHATLOOP_AB_FUTILITY)
    futility: float = 0.5
    thumb_weight: float = 0.5  # a thumb's weight against a comparison's in the pooled win rate
    # An undecided test whose win rate so far is above this keeps its place when a newer candidate arrives (which
    # then waits for it to end); 1: every newer candidate takes its place (the service's is CHATLOOP_AB_HOLD_WIN_RATE)
    hold: float = 1.0
    bootstrap: int = 2000
    seed: int = 0

    def holds(self, win_rate: float) -> bool:
        """Whether an undecided test with this win rate so far keeps its place against a newer candidate."""
        return win_rate > self.hold

    def interval(self, evidence: "Evidence") -> tuple[float, float, float]:
        """win_rate_interval at these rules' level, resamples, seed and thumb weight."""
        return win_rate_interval(evidence, self.confidence, self.bootstrap, self.seed, self.thumb_weight)


@dataclass
class Evidence:
    """The blind votes a test counts, oldest first."""

    comparisons: list[float] = field(default_factory=list)  # the candidate's outcome: 1 win, 0 loss, 1/2 tie
    candidate_thumbs: list[float] = field(default_factory=list)  # 1 up, 0 down, on the candidate's answers
    production_thumbs: list[float] = field(default_factory=list)  # the same on production's

    @property
    def votes(self) -> int:
        return len(self.comparisons) + len(self.candidate_thumbs) + len(self.production_thumbs)

    def as_dict(self) -> dict:
        """The counts and rates a run record shows."""
        rate = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
        return {"comparisons": len(self.comparisons), "comparison_win_rate": rate(self.comparisons),
                "thumbs": [len(self.candidate_thumbs), len(self.production_thumbs)],
                "thumbs_up_rate": [rate(self.candidate_thumbs), rate(self.production_thumbs)]}


def outcomes(events: list[FeedbackEvent], test: ABTest, max_votes_per_voter: int) -> Evidence:
    """The blind votes on the candidate's and production's answers, as the test counts them."""
    versions = {test.candidate, test.production}
    per_voter: dict[str, int] = defaultdict(int)
    evidence = Evidence()
    for event in latest_votes(e for e in events if e.blind):
        adapters = [a.adapter for a in event.answers]
        if per_voter[event.voter] >= max_votes_per_voter:
            continue
        if event.kind == "thumb":
            if adapters[0] not in versions:
                continue
            thumbs = evidence.candidate_thumbs if adapters[0] == test.candidate else evidence.production_thumbs
            thumbs.append(1.0 if event.rating == 1 else 0.0)
        else:
            if len(adapters) != 2 or set(adapters) != versions:
                continue
            if event.verdict == "tie":
                score = 0.5
            elif event.preferred is not None or event.ranking is not None:
                winner = event.preferred if event.preferred is not None else event.ranking[0]
                score = 1.0 if adapters[winner] == test.candidate else 0.0
            else:  # "both bad" says nothing about which is better
                continue
            evidence.comparisons.append(score)
        per_voter[event.voter] += 1
    return evidence


def _weights(evidence: Evidence, thumb_weight: float) -> tuple[float, float]:
    """(comparisons', thumbs') weights in the pooled win rate: their numbers, thumbs as an effective number
    (4 n_c n_p / (n_c + n_p): all of them when the versions got even shares, fewer when one got most) times the
    thumb weight."""
    n_c, n_p = len(evidence.candidate_thumbs), len(evidence.production_thumbs)
    thumbs = 4 * n_c * n_p / (n_c + n_p) if n_c and n_p else 0.0
    return float(len(evidence.comparisons)), thumb_weight * thumbs


def pooled_win_rate(p: np.ndarray | float, up_candidate: np.ndarray | float, up_production: np.ndarray | float,
                    weights: tuple[float, float]) -> np.ndarray | float:
    """(w_c p + w_t q) / (w_c + w_t), q = 1/2 + (u_c - u_p) / 2, from the comparisons' mean outcome p and the
    versions' thumbs-up rates (numbers, or arrays of one shape; a kind with no weight is not read)."""
    w_c, w_t = weights
    q = 0.5 + (up_candidate - up_production) / 2 if w_t else 0.5
    return (w_c * (p if w_c else 0.5) + w_t * q) / (w_c + w_t)


def _resampled_means(xs: list[float], bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """The mean of each of `bootstrap` resamples of xs with replacement (zeros if xs is empty). (bootstrap,)"""
    if not xs:
        return np.zeros(bootstrap)
    values = np.asarray(xs, dtype=np.float64)
    return values[rng.integers(0, len(values), size=(bootstrap, len(values)))].mean(axis=1)


def win_rate_interval(evidence: Evidence, confidence: float = 0.95, bootstrap: int = 2000, seed: int = 0,
                      thumb_weight: float = 0.5) -> tuple[float, float, float]:
    """(mean, lower, upper): the pooled win rate and its percentile bootstrap interval, each kind of vote
    resampled on its own (the weights depend on the numbers only, which resampling keeps)."""
    weights = _weights(evidence, thumb_weight)
    if not any(weights):
        return 0.5, 0.0, 1.0
    rng = np.random.default_rng(seed)
    kinds = (evidence.comparisons, evidence.candidate_thumbs, evidence.production_thumbs)
    means = np.sort(pooled_win_rate(*(_resampled_means(xs, bootstrap, rng) for xs in kinds), weights=weights))
    tail = (1 - confidence) / 2
    mean = float(pooled_win_rate(*(np.mean(xs) if xs else 0.0 for xs in kinds), weights=weights))
    return mean, float(means[int(tail * (bootstrap - 1))]), float(means[int((1 - tail) * (bootstrap - 1))])


def decide(evidence: Evidence, test: ABTest, now: float, rules: ABRules,
           interval: tuple[float, float, float] | None = None) -> Decision:
    """The verdict on the candidate so far, and why. interval: rules.interval(evidence), if the caller has it."""
    mean, lower, upper = interval or rules.interval(evidence)
    summary = f"win rate {mean:.3f} [{lower:.3f}, {upper:.3f}] over {evidence.votes} votes"
    if evidence.candidate_thumbs or evidence.production_thumbs:
        summary += f" ({len(evidence.comparisons)} comparisons, {len(evidence.candidate_thumbs)} + " \
                   f"{len(evidence.production_thumbs)} thumbs)"
    enough = sum(_weights(evidence, rules.thumb_weight)) >= rules.min_votes  # in comparisons' worth
    if enough:
        if lower > 0.5:
            return Decision("promote", "evidence", f"users prefer it: {summary}")
        if upper < 0.5:
            return Decision("reject", "evidence", f"users prefer production: {summary}")
        if upper < rules.futility:
            return Decision("reject", "futility", f"no gain worth the test (a win rate of {rules.futility:g} is "
                            f"ruled out): {summary}")
    if now < test.deadline:
        return Decision("wait", "pending", summary)
    if not enough:
        return Decision("promote", "quiet", f"deadline passed with too few votes to tell ({summary}); the offline "
                        "checks decide")
    return Decision("reject", "deadline", f"deadline passed without evidence that users prefer it: {summary}")
