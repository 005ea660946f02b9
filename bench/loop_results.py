"""A learning-benchmark run's outcome from its results file (bench/loop.py): the runs, PPO first, grouped by
configuration; each run's last promoted version against the base; the mean and spread over seeds."""

import json
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

from bench.loop_eval import paired_difference

ALGORITHMS = ("ppo", "dpo", "kto")


def load_results(results_dir: Path) -> list[dict]:
    """Every run's results, PPO first, vader before other preferences, then by seed."""
    results = []
    for path in sorted(results_dir.glob("loop-*.json")):
        result = json.loads(path.read_text())
        if "name" not in result:
            print(f"note: ignoring {path.name}, written by an earlier bench/loop.py (no run name)")
            continue
        results.append(result)
    return sorted(results, key=lambda r: (ALGORITHMS.index(r["algorithm"]) if r["algorithm"] in ALGORITHMS else 9,
                                          r["preference"] != "vader", r["preference"], r["seed"]))


def groups(results: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Runs by (algorithm, preference): the seeds of one configuration."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        out.setdefault((r["algorithm"], r["preference"]), []).append(r)
    return out


def versions(result: dict) -> list[str]:
    """The base, then every promoted version in promotion order."""
    return ["base", *(p["version"] for p in result["promotions"])]


@dataclass
class Final:
    """A run's outcome: its last promoted version (the base when nothing was promoted) against the base."""

    version: str
    gain: float  # paired difference of held-out scores, last - base
    gain_se: float
    kl: float
    length_ratio: float
    eos_change: float
    regressions: int  # promoted versions more than 2 SE below their predecessor


def final(result: dict) -> Final:
    last = versions(result)[-1]
    base, policy = result["policies"]["base"], result["policies"][last]
    gain, se = paired_difference(policy["scores"], base["scores"]) if last != "base" else (0.0, 0.0)
    return Final(last, gain, se, policy["kl"] if last != "base" else 0.0, policy["length"] / base["length"],
                 policy["eos"] - base["eos"], sum(step["regression"] for step in result["promoted_steps"]))


@dataclass
class SeedSummary:
    algorithm: str
    preference: str
    seeds: list[int]
    gain: float  # mean over seeds of the final gain
    low: float
    high: float
    kl: float  # mean over seeds
    regressions: int  # summed over seeds


def seed_summaries(results: list[dict]) -> list[SeedSummary]:
    out = []
    for (algorithm, preference), runs in groups(results).items():
        finals = [final(r) for r in runs]
        gains = [f.gain for f in finals]
        out.append(SeedSummary(algorithm, preference, [r["seed"] for r in runs], fmean(gains), min(gains),
                               max(gains), fmean(f.kl for f in finals), sum(f.regressions for f in finals)))
    return out
