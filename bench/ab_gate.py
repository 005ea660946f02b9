"""How often the online A/B gate promotes a candidate its users do not prefer, and how soon it promotes one they
do: the service's own decision rule (`service.feedback.ab.decide` with the service's default settings) on
simulated streams of blind votes.

One trial is one test. Comparison votes arrive at `--votes-per-min` (the learning benchmark's tests collected
20-36 a minute); each is a tie (1/2) with probability `--ties` and otherwise a win for the candidate with the
probability that makes its expected outcome the true win rate p. Thumbs on single answers arrive at each
`--thumbs-per-min` (0: comparisons only, as before the test counted thumbs), split evenly between the two
versions at random; production's are up with probability `--thumbs-up`, the candidate's with that plus
`--thumb-gap` x (p - 1/2): on the learning benchmark's held-out answers, the promoted PPO versions' thumbs-up
rates rose by 0.04-0.045 where their win rates were 0.534-0.545, a gap of about 1. Beat looks once every
`retrain_every_s` (as `chatloop beat` does), and the test ends at the first verdict or at `ab_deadline_s`. For
each p the table gives the share of trials promoted, rejected because the users prefer production, rejected
because the interval rules out a worthwhile gain (`ab_futility`) and rejected at the deadline, the median number
of votes and minutes at a promotion, and the median minute a test ended, whatever its verdict. With p = 0.5 every
promotion is a false one: a rule with a fixed 95 % interval looked at every minute promotes more often than the
2.5 % a single look would.

    .venv/bin/python -m bench.ab_gate [--trials 200 --rates 0.45 0.5 0.55 0.6 --thumbs-per-min 0 25]
    CHATLOOP_AB_CONFIDENCE=0.99 .venv/bin/python -m bench.ab_gate   # any CHATLOOP_AB_* setting, as the service reads it

Pure CPU, a few minutes on 2 cores with the default 2,000 bootstrap resamples per look.
"""

import argparse
import random
import statistics
import time
from dataclasses import dataclass

from service.feedback.ab import ABRules, ABTest, Evidence, decide
from service.settings import Settings
from workers.tasks import ab_rules


@dataclass(frozen=True)
class Thumbs:
    per_min: float = 0.0  # thumbs a minute on the test's single answers, both versions together
    up: float = 0.44  # production's thumbs-up rate (the base's on the learning benchmark's held-out answers)
    gap: float = 1.0  # the candidate's is higher by gap x (p - 1/2)


class Voters:
    """The users' blind votes on one test as they arrive: comparisons at `votes_per_min`, a tie with probability
    `ties` and otherwise a win with the probability that makes the expected outcome the true win rate p; thumbs at
    `thumbs.per_min`, split evenly between the versions at random."""

    def __init__(self, p: float, ties: float, votes_per_min: float, thumbs: Thumbs, rng: random.Random) -> None:
        if not ties / 2 <= p <= 1 - ties / 2:
            raise ValueError(f"a win rate of {p} is impossible with {ties:.0%} ties")
        self.ties, self.votes_per_min, self.thumbs, self.rng = ties, votes_per_min, thumbs, rng
        self.win = (p - ties / 2) / (1 - ties) if ties < 1 else 0.0  # P(win | not a tie): the expected outcome is p
        self.up = {"candidate": min(1.0, max(0.0, thumbs.up + thumbs.gap * (p - 0.5))), "production": thumbs.up}
        self.evidence = Evidence()
        self.thumbed = 0

    def until(self, seconds: float) -> Evidence:
        """The evidence once the test has run `seconds`."""
        evidence, rng = self.evidence, self.rng
        while len(evidence.comparisons) < int(self.votes_per_min * seconds / 60):
            evidence.comparisons.append(0.5 if rng.random() < self.ties else float(rng.random() < self.win))
        while self.thumbed < int(self.thumbs.per_min * seconds / 60):
            version = rng.choice(("candidate", "production"))
            arm = evidence.candidate_thumbs if version == "candidate" else evidence.production_thumbs
            arm.append(float(rng.random() < self.up[version]))
            self.thumbed += 1
        return evidence


def one_test(p: float, ties: float, votes_per_min: float, rules: ABRules, look_s: int, deadline_s: int,
             rng: random.Random, thumbs: Thumbs = Thumbs()) -> tuple[str, int, float]:
    """(outcome, votes, minute) of one simulated test: promote, reject (the users prefer production), futility
    or deadline."""
    test = ABTest(candidate="candidate", production="production", run_id="sim", started=0.0, deadline=deadline_s)
    voters = Voters(p, ties, votes_per_min, thumbs, rng)
    now = 0.0
    while True:
        now += look_s
        evidence = voters.until(now)
        verdict, cause, _ = decide(evidence, test, now, rules)
        if verdict != "wait":
            return (cause if verdict == "reject" and cause != "evidence" else verdict), evidence.votes, now / 60


def main() -> None:
    settings = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.45, 0.5, 0.55, 0.6], help="true win rates")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--votes-per-min", type=float, default=25.0, help="comparison votes a minute")
    parser.add_argument("--ties", type=float, default=0.13, help="share of tied votes (the benchmark's ~13 %%)")
    parser.add_argument("--thumbs-per-min", type=float, nargs="+", default=[0.0, 25.0],
                        help="thumbs a minute on the test's single answers; one table for each")
    parser.add_argument("--thumbs-up", type=float, default=Thumbs.up, help="production's thumbs-up rate")
    parser.add_argument("--thumb-gap", type=float, default=Thumbs.gap,
                        help="the candidate's thumbs-up rate is higher by this x (win rate - 1/2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rules = ab_rules(settings)  # the worker's own, from the settings (CHATLOOP_AB_*)
    print(f"rule: promote when the {rules.confidence:.0%} bootstrap lower bound ({rules.bootstrap} resamples) > 0.5, "
          f"reject when the upper bound < 0.5 or < {rules.futility:g} (no worthwhile gain), not before "
          f"{rules.min_votes} votes; a look every "
          f"{settings.retrain_every_s} s, deadline {settings.ab_deadline_s} s; {args.votes_per_min:g} votes a minute, "
          f"{args.ties:.0%} ties; thumbs up at {args.thumbs_up:.2f} on production, higher by {args.thumb_gap:g} x "
          f"(win rate - 1/2) on the candidate, a thumb weighing {rules.thumb_weight:g}; {args.trials} trials per rate")
    start = time.perf_counter()
    for per_min in args.thumbs_per_min:
        thumbs = Thumbs(per_min, args.thumbs_up, args.thumb_gap)
        print(f"\n{per_min:g} thumbs a minute\n")
        print("| true win rate | promoted | rejected: users prefer production | rejected: no worthwhile gain | "
              "rejected at the deadline | votes at promotion (median) | minute of promotion (median) | minute the "
              "test ended (median) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for p in args.rates:
            rng = random.Random(args.seed)
            results = [one_test(p, args.ties, args.votes_per_min, rules, settings.retrain_every_s,
                                settings.ab_deadline_s, rng, thumbs) for _ in range(args.trials)]
            share = {v: sum(r[0] == v for r in results) / len(results)
                     for v in ("promote", "reject", "futility", "deadline")}
            promoted = [r for r in results if r[0] == "promote"]
            votes = f"{statistics.median(r[1] for r in promoted):.0f}" if promoted else "–"
            minute = f"{statistics.median(r[2] for r in promoted):.0f}" if promoted else "–"
            print(f"| {p:.2f} | {share['promote']:.1%} | {share['reject']:.1%} | {share['futility']:.1%} | "
                  f"{share['deadline']:.1%} | {votes} | {minute} | {statistics.median(r[2] for r in results):.0f} |",
                  flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
