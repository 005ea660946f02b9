"""What a stream of candidates makes of the online A/B test: whether a test that leads keeps its place
(`CHATLOOP_AB_HOLD_WIN_RATE`) or gives way to every newer candidate, simulated with the service's own decision rule
(`service.feedback.ab.decide` and `ABRules.holds`, at the service's settings) on simulated votes (bench/ab_gate.py).

One trial is one deployment over `--minutes`. A candidate passes the offline checks every `--every` minutes (the
learning benchmark's runs started every 4-7 minutes), trained from the version that was production `--every`
minutes earlier; its quality is its parent's plus a gain drawn from N(`--gain`, `--spread`), in win-rate units:
against production the users prefer it at 1/2 + (its quality - production's). Each arrival does what enter_ab
does: an undecided test that leads (`holds`) keeps its place and the candidate waits (only the newest waits);
otherwise the candidate takes the test's place. Beat looks every `retrain_every_s`: it decides the test if the
evidence allows, then starts the waiting candidate's test if none runs. The table gives, for each hold, the mean
quality production reached over the base's (in win-rate units, with its standard error over trials), the
promotions per deployment, the promotions of a candidate worse than the production it replaced, and the tests
that ended by a verdict or by giving way.

    .venv/bin/python -m bench.ab_queue [--trials 100 --holds 1 0.5 --gains 0 0.03]

Pure CPU, a few minutes on 2 cores.
"""

import argparse
import itertools
import random
import statistics
import time
from dataclasses import dataclass, field, replace

from bench.ab_gate import Thumbs, Voters
from service.feedback.ab import ABRules, ABTest, decide
from service.settings import Settings
from workers.tasks import ab_rules


@dataclass
class Deployment:
    """The versions' qualities, production over time, the running test and the waiting candidate."""

    quality: dict[str, float] = field(default_factory=lambda: {"base": 0.0})
    productions: list[tuple[float, str]] = field(default_factory=lambda: [(0.0, "base")])  # (minute, version)
    test: tuple[ABTest, Voters] | None = None
    waiting: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("promoted", "worse promoted", "decided", "gave way", "waited", "displaced"), 0))

    @property
    def production(self) -> str:
        return self.productions[-1][1]

    def production_at(self, minute: float) -> str:
        return [v for t, v in self.productions if t <= minute][-1]


@dataclass(frozen=True)
class Stream:
    every: float  # minutes between candidates
    gain: float  # mean quality gain of a candidate over its parent
    spread: float  # its standard deviation
    votes_per_min: float
    ties: float
    thumbs: Thumbs


def start(d: Deployment, version: str, now_s: float, deadline_s: int, stream: Stream, rng: random.Random) -> None:
    p = 0.5 + d.quality[version] - d.quality[d.production]
    p = min(max(p, stream.ties / 2), 1 - stream.ties / 2)
    test = ABTest(candidate=version, production=d.production, run_id=version, started=now_s,
                  deadline=now_s + deadline_s)
    d.test = (test, Voters(p, stream.ties, stream.votes_per_min, stream.thumbs, rng))


def settle(d: Deployment, now_s: float, rules: ABRules) -> float | None:
    """Beat's look: decide the test if the evidence allows; the win rate so far if it goes on, else None."""
    if d.test is None:
        return None
    test, voters = d.test
    evidence = voters.until(now_s - test.started)
    interval = rules.interval(evidence)
    verdict = decide(evidence, test, now_s, rules, interval).verdict
    if verdict == "wait":
        return interval[0]
    d.test = None
    d.counts["decided"] += 1
    if verdict == "promote":
        d.counts["promoted"] += 1
        d.counts["worse promoted"] += d.quality[test.candidate] < d.quality[test.production]
        d.productions.append((now_s / 60, test.candidate))
    return None


def one_deployment(stream: Stream, rules: ABRules, minutes: float, look_s: int, deadline_s: int,
                   rng: random.Random) -> Deployment:
    d = Deployment()
    arrivals = itertools.count(1)
    next_arrival = stream.every
    for now_s in range(look_s, int(minutes * 60) + 1, look_s):
        running = settle(d, now_s, rules)
        if d.test is None and d.waiting is not None:
            start(d, d.waiting, now_s, deadline_s, stream, rng)
            d.waiting = None
        while now_s / 60 >= next_arrival:  # a candidate passed the offline checks since the last look
            version = f"v{next(arrivals)}"
            parent = d.production_at(next_arrival - stream.every)
            d.quality[version] = d.quality[parent] + rng.gauss(stream.gain, stream.spread)
            next_arrival += stream.every
            if running is not None and rules.holds(running):  # the running test's win rate so far
                d.counts["waited"] += 1
                d.counts["displaced"] += d.waiting is not None
                d.waiting = version
                continue
            d.counts["gave way"] += d.test is not None
            start(d, version, now_s, deadline_s, stream, rng)
            running = 0.5  # the new test has no votes yet
    return d


def main() -> None:
    settings = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--holds", type=float, nargs="+", default=[1.0, 0.5], help="CHATLOOP_AB_HOLD_WIN_RATE values")
    parser.add_argument("--gains", type=float, nargs="+", default=[0.0, 0.03],
                        help="mean quality gain of a candidate over its parent (win-rate units)")
    parser.add_argument("--spread", type=float, default=0.05, help="its standard deviation")
    parser.add_argument("--every", type=float, default=4.0, help="minutes between candidates")
    parser.add_argument("--minutes", type=float, nargs="+", default=[30.0, 120.0], help="deployment lengths")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--votes-per-min", type=float, default=25.0)
    parser.add_argument("--thumbs-per-min", type=float, default=25.0)
    parser.add_argument("--ties", type=float, default=0.13)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rules = ab_rules(settings)
    print(f"a candidate every {args.every:g} min, its gain over its parent N(gain, {args.spread:g}); "
          f"{args.votes_per_min:g} comparisons and {args.thumbs_per_min:g} thumbs a minute, {args.ties:.0%} ties; "
          f"the service's rule (futility {rules.futility:g}, {rules.min_votes} votes before a verdict, deadline "
          f"{settings.ab_deadline_s} s, a look every {settings.retrain_every_s} s); {args.trials} trials each\n")
    print("| minutes | gain | hold | production's quality over the base | promoted | worse than the one it replaced "
          "| tests decided | tests that gave way | candidates that waited (displaced) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    started = time.perf_counter()
    for minutes in args.minutes:
        for gain in args.gains:
            stream = Stream(args.every, gain, args.spread, args.votes_per_min, args.ties,
                            Thumbs(per_min=args.thumbs_per_min))
            for hold in args.holds:
                held = replace(rules, hold=hold)
                runs = [one_deployment(stream, held, minutes, settings.retrain_every_s, settings.ab_deadline_s,
                                       random.Random(args.seed * 10**6 + trial)) for trial in range(args.trials)]
                q = [d.quality[d.production] for d in runs]
                se = statistics.stdev(q) / len(q) ** 0.5
                mean = {k: statistics.mean(d.counts[k] for d in runs) for k in runs[0].counts}
                print(f"| {minutes:g} | {gain:+.2f} | {hold:g} | {statistics.mean(q):+.3f} ± {se:.3f} | "
                      f"{mean['promoted']:.2f} | {mean['worse promoted']:.2f} | {mean['decided']:.2f} | "
                      f"{mean['gave way']:.2f} | {mean['waited']:.2f} ({mean['displaced']:.2f}) |", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
