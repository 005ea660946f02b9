"""The learning benchmark's report: tables in bench/RESULTS.md and plots in docs/ from bench/results/loop-*.json.

    python -m bench.loop_report   # re-render from the results files without running anything

One results file per run (algorithm:preference:seed, bench/loop.py). Reported: issue 14's targets, met or missed by
how much (a run that is missing is "not run", never met); the count of promoted regressions (a promoted version more
than two standard errors of the paired difference below its predecessor); the mean and spread over seeds; each run's
last version against the base; every promoted version against its predecessor with the A/B evidence that promoted it;
and every reward model judged against the preference itself.
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

from bench.loop import DEFAULT_RUNS, parse_run, run_name
from bench.loop_eval import markdown_table
from bench.loop_plots import plot_learning_curve, plot_reward_curve
from bench.loop_results import SeedSummary, final, groups, load_results, seed_summaries, versions
from bench.serve import write_results

DOCS = Path(__file__).resolve().parent.parent / "docs"
LABEL = "Learning benchmark (bench/loop.py)"
# issue 14's targets
TARGET_GAIN = 0.25  # held-out gain over the base, PPO on vader users, mean of PPO_SEEDS seeds
PPO_SEEDS = 2
KL_BUDGET = 12.0  # nats
MIN_LENGTH_RATIO = 0.5  # below this share of the base's length, the answers collapsed
RM_ACCURACY, RM_LOW, RM_VOTES = 0.75, 0.70, 1500
CAPTURE = 0.60  # best-of-4 by the reward model over best-of-4 by the preference
PACE_RATIO = 2.0  # two sets of runs whose mean machine paces are further apart than this do not compare


def _minute(t: float | None) -> str:
    return "–" if t is None else f"{t / 60:.1f}"


def _score(p: dict) -> str:
    return f"{p['score']:.3f} ± {p['score_se']:.3f}"


def _interval(x: float | None, low: float | None, high: float | None) -> str:
    return "–" if x is None else f"{x:.2f} [{low:.2f}, {high:.2f}]"


def _heldout_votes(metrics: dict | None) -> str:
    """The service's own reward model metric: accuracy on its held-out share of the users' votes."""
    m = metrics or {}
    interval = _interval(m.get("reward/heldout_accuracy"), m.get("reward/heldout_accuracy_low"),
                         m.get("reward/heldout_accuracy_high"))
    pairs = m.get("reward/heldout_pairs")
    return interval if pairs is None or interval == "–" else f"{interval}, {pairs} pair{'s' * (pairs != 1)}"


def feature_seconds(result: dict) -> float | None:
    """The machine's pace, measured in the run: seconds an answer for the reward model's base features, over all
    its reward stages (the budget is wall-clock, so a slower machine starts fewer training runs in it)."""
    metrics = [run.get("reward_metrics") or {} for run in result["runs"]]
    answers = sum(m.get("reward/answers", 0) - m.get("reward/cached_answers", 0) for m in metrics)
    return sum(m.get("reward/feature_seconds", 0.0) for m in metrics) / answers if answers else None


def run_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        f, promoted = final(r), r["promotions"]
        base, last = r["policies"]["base"], r["policies"][f.version]
        pace = feature_seconds(r)
        rows.append([
            r["name"], str(len(r["runs"])), "–" if pace is None else f"{pace:.2f}",
            str(len(promoted)), _minute(promoted[-1]["t"] if promoted else None),
            f"{_score(base)} → {_score(last)}", f"{f.gain:+.3f} ± {f.gain_se:.3f}", f"{f.kl:.2f}",
            f"{base['length']:.1f} → {last['length']:.1f}", f"{base['eos']:.2f} → {last['eos']:.2f}",
            str(f.regressions),
        ])
    return markdown_table(["run", "runs started", "RM features (s an answer)", "promoted", "minute of last",
                           "held-out score (base → last)", "last − base (paired)", "KL (nats)", "length (base → last)",
                           "EOS (base → last)", "promoted regressions"], rows)


def _ab(ab: dict | None) -> str:
    if not ab:
        return "–"
    if not ab.get("votes"):  # a candidate that waited for its turn and never met its users
        return ab["reason"]
    why = ab["reason"].split(":")[0].split(" (")[0]  # "users prefer it", "deadline passed with too few votes..."
    return f"{ab['votes']} votes, {ab['win_rate']:.2f} [{ab['ci95'][0]:.2f}, {ab['ci95'][1]:.2f}]: {why}"


def version_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        steps = {s["version"]: s for s in r["promoted_steps"]}
        promoter = {x["candidate"]: x for x in r["runs"] if x.get("candidate")}  # each run trains its own version
        for version in versions(r):
            p, step, run = r["policies"][version], steps.get(version), promoter.get(version, {})
            vs = "–" if step is None else (f"{step['diff']:+.3f} ± {step['se']:.3f} vs {step['previous']}"
                                           + (" **regression**" if step["regression"] else ""))
            rows.append([r["name"], version, _minute(p.get("t")), "–" if p.get("events") is None else str(p["events"]),
                         _score(p), vs, f"{p['kl']:.2f}", f"{p['length']:.1f}", f"{p['eos']:.2f}",
                         _ab(run.get("ab")), _heldout_votes(run.get("reward_metrics"))])
    return markdown_table(["run", "version", "minute", "feedback events", "held-out score",
                           "vs predecessor (paired)", "KL (nats)", "length", "EOS", "A/B votes, win rate [95 %]",
                           "RM held-out votes acc [95 %]"], rows)


def seed_table(summaries: list[SeedSummary]) -> str:
    rows = [[s.algorithm, s.preference, ", ".join(map(str, s.seeds)), f"{s.gain:+.3f}",
             f"{s.low:+.3f} to {s.high:+.3f}", f"{s.kl:.2f}", str(s.regressions)] for s in summaries]
    return markdown_table(["algorithm", "preference", "seeds", "final gain, mean", "spread (min to max)",
                           "mean KL (nats)", "promoted regressions"], rows)


def _best_of(judged: dict, n: int) -> str:
    b = judged.get(f"best_of_{n}")
    return "–" if b is None else f"{b['reward_model']:+.3f} / {b['preference']:+.3f} ({100 * b['captured']:.0f} %)"


def reward_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        metrics = {x["id"]: x.get("reward_metrics") for x in r["runs"]}
        for m in sorted(r["reward_models"], key=lambda m: m["votes"]):
            a = m["pair_accuracy"]
            pair = f"{_interval(a['accuracy'], a['low'], a['high'])} ({a['pairs']} pairs)" if a["pairs"] else "no pairs"
            rows.append([r["name"], m["run_id"], _minute(m["t"]), f"{m['votes']:,}", pair, _best_of(m, 4),
                         _best_of(m, 16), _heldout_votes(metrics.get(m["run_id"]))])
    return markdown_table(["run", "RM of run", "minute", "votes", "accuracy, pairs > 0.2 apart [95 %]",
                           "best-of-4: RM / preference (captured)", "best-of-16: RM / preference (captured)",
                           "held-out votes acc [95 %]"], rows)


@dataclass
class Target:
    name: str
    measured: str
    status: str  # "met", "missed: ..." or "not run ..."


def _verdict(met: bool, missed: str) -> str:
    return "met" if met else f"missed: {missed}"


def ppo_vader_targets(runs: list[dict]) -> list[Target]:
    seeds = f"mean of the seeds (at least {PPO_SEEDS})" if len(runs) > PPO_SEEDS else f"mean of {PPO_SEEDS} seeds"
    names = [f"PPO, vader users: held-out gain ≥ +{TARGET_GAIN} over the base, {seeds}",
             f"PPO, vader users: at ≤ {KL_BUDGET:g} nats (mean KL of the last promoted)",
             f"PPO, vader users: no length collapse (length ≥ {MIN_LENGTH_RATIO} × the base's, every seed)",
             "PPO, vader users: EOS rate not below the base's (every seed)"]
    if not runs:
        return [Target(name, "–", "not run") for name in names]
    finals = [final(r) for r in runs]
    gain, kl = fmean(f.gain for f in finals), fmean(f.kl for f in finals)
    ratio, eos = min(f.length_ratio for f in finals), min(f.eos_change for f in finals)
    per_seed = ", ".join(f"s{r['seed']} {f.gain:+.3f} ± {f.gain_se:.3f}" for r, f in zip(runs, finals, strict=True))
    measured = [f"{gain:+.3f} ({per_seed})", f"{kl:.2f} nats", f"{ratio:.2f} × base (lowest)",
                f"{eos:+.2f} (lowest change)"]
    statuses = [_verdict(gain >= TARGET_GAIN, f"{TARGET_GAIN - gain:.3f} short"),
                _verdict(kl <= KL_BUDGET, f"{kl - KL_BUDGET:.2f} nats over"),
                _verdict(ratio >= MIN_LENGTH_RATIO, f"{MIN_LENGTH_RATIO - ratio:.2f} × base short"),
                _verdict(eos >= 0, f"{-eos:.2f} below the base")]
    if len(runs) < PPO_SEEDS:
        statuses = [f"not run ({len(runs)} of {PPO_SEEDS} seeds)"] * len(names)
    return [Target(*row) for row in zip(names, measured, statuses, strict=True)]


def concise_targets(runs: list[dict]) -> list[Target]:
    names = ["PPO, concise users: held-out concise score rises (by more than 2 SE, every run)",
             "PPO, concise users: EOS rate rises (every run)"]
    if not runs:
        return [Target(name, "–", "not run") for name in names]
    finals = [final(r) for r in runs]
    margin = min(f.gain - 2 * f.gain_se for f in finals)
    eos = min(f.eos_change for f in finals)
    return [
        Target(names[0], ", ".join(f"{f.gain:+.3f} ± {f.gain_se:.3f}" for f in finals),
               _verdict(margin > 0, f"{-margin:.3f} short of 2 SE above the base")),
        Target(names[1], ", ".join(f"{f.eos_change:+.2f}" for f in finals), _verdict(eos > 0, f"change {eos:+.2f}")),
    ]


def paces(runs: list[dict]) -> list[float]:
    """The machine pace (feature_seconds) of each run that measured one."""
    return [p for r in runs if (p := feature_seconds(r)) is not None]


def _pace(values: list[float]) -> str:
    if not values:
        return "–"
    low, high = f"{min(values):.2f}", f"{max(values):.2f}"
    return low if low == high else f"{low}-{high}"


def versus_target(summaries: dict[tuple[str, str], SeedSummary], by_group: dict[tuple[str, str], list[dict]],
                  other: str) -> Target:
    """PPO's mean final gain on vader users against another algorithm's, with the machine pace of each side's runs:
    the budget is wall-clock, so where the two sides' mean paces are more than PACE_RATIO apart the status says so."""
    name = f"PPO ≥ {other.upper()} on vader users (mean final gain)"
    ppo, rival = summaries.get(("ppo", "vader")), summaries.get((other, "vader"))
    if ppo is None or rival is None:
        missing = [n for n, s in (("ppo", ppo), (other, rival)) if s is None]
        return Target(name, "–", f"not run ({', '.join(f'{m}-vader' for m in missing)})")
    ours, theirs = paces(by_group[("ppo", "vader")]), paces(by_group[(other, "vader")])
    status = _verdict(ppo.gain >= rival.gain, f"{rival.gain - ppo.gain:.3f} short")
    if ours and theirs:
        slow, fast = sorted((fmean(ours), fmean(theirs)), reverse=True)
        if slow / fast > PACE_RATIO:
            status += f", but on machines more than {PACE_RATIO:g}× apart in pace: not one comparison"
    return Target(name, f"PPO {ppo.gain:+.3f} vs {other.upper()} {rival.gain:+.3f} (machine pace, RM features s an "
                        f"answer: {_pace(ours)} vs {_pace(theirs)})", status)


def reward_accuracy_target(results: list[dict]) -> Target:
    name = (f"Reward model: accuracy ≥ {RM_ACCURACY} (95 % lower bound ≥ {RM_LOW:.2f}) on pairs > 0.2 apart, "
            f"after ≤ {RM_VOTES:,} votes (best of the vader runs)")
    judged = [(r, m) for r in results if r["preference"] == "vader" for m in r["reward_models"]
              if m["pair_accuracy"]["pairs"]]
    if not judged:
        return Target(name, "–", "not run" if not any(r["preference"] == "vader" for r in results)
                      else "not run (no reward model judged)")
    early = [(r, m) for r, m in judged if m["votes"] <= RM_VOTES]
    if not early:
        return Target(name, f"first judged at {min(m['votes'] for _, m in judged):,} votes",
                      f"missed: no reward model judged at ≤ {RM_VOTES:,} votes")

    def reached(a: dict) -> bool:
        return a["accuracy"] >= RM_ACCURACY and a["low"] >= RM_LOW

    r, m = max(early, key=lambda rm: (reached(rm[1]["pair_accuracy"]), rm[1]["pair_accuracy"]["low"],
                                      rm[1]["pair_accuracy"]["accuracy"]))
    a = m["pair_accuracy"]
    short = [f"{what} {target - x:.2f} short" for what, x, target in
             (("accuracy", a["accuracy"], RM_ACCURACY), ("lower bound", a["low"], RM_LOW)) if x < target]
    return Target(name, f"{_interval(a['accuracy'], a['low'], a['high'])} at {m['votes']:,} votes "
                        f"({r['name']}, run {m['run_id']})",
                  _verdict(reached(a), "none reached it; best " + ", ".join(short)))


def capture_target(results: list[dict]) -> Target:
    name = (f"Best-of-4 with the RM captures ≥ {100 * CAPTURE:.0f} % of best-of-4 with the preference "
            "(each vader run's last RM, mean)")
    vader = [r for r in results if r["preference"] == "vader"]
    last = [(r, max(judged, key=lambda m: m["votes"])) for r in vader
            if (judged := [m for m in r["reward_models"] if "best_of_4" in m])]
    if not last:
        return Target(name, "–", "not run" if not vader else "not run (no reward model judged)")
    share = fmean(m["best_of_4"]["captured"] for _, m in last)
    each = ", ".join(f"{r['name']} {100 * m['best_of_4']['captured']:.0f} %" for r, m in last)
    return Target(name, f"{100 * share:.0f} % ({each})",
                  _verdict(share >= CAPTURE, f"{100 * (CAPTURE - share):.0f} points short"))


def regression_count(results: list[dict]) -> int:
    return sum(final(r).regressions for r in results)


def regression_target(results: list[dict]) -> Target:
    name = "0 promoted regressions across every benchmark run"
    count = regression_count(results)
    present = {r["name"] for r in results}
    missing = [n for n in (run_name(*parse_run(x)) for x in DEFAULT_RUNS) if n not in present]
    status = (f"missed: {count} promoted regression(s)" if count else
              f"not run: {', '.join(missing)}" if missing else "met")
    return Target(name, f"{count} in {len(results)} run(s)", status)


def targets(results: list[dict]) -> list[Target]:
    by_group = groups(results)
    summaries = {(s.algorithm, s.preference): s for s in seed_summaries(results)}
    return [
        *ppo_vader_targets(by_group.get(("ppo", "vader"), [])),
        *concise_targets(by_group.get(("ppo", "concise"), [])),
        versus_target(summaries, by_group, "dpo"),
        versus_target(summaries, by_group, "kto"),
        reward_accuracy_target(results),
        capture_target(results),
        regression_target(results),
    ]


def target_table(rows: list[Target]) -> str:
    return markdown_table(["target (issue 14)", "measured", "status"], [[t.name, t.measured, t.status] for t in rows])


def headline(results: list[dict]) -> str:
    """The promoted regressions, counted over every run and named."""
    named = [f"{r['name']} {s['version']} {s['diff']:+.3f} ± {s['se']:.3f} vs {s['previous']}"
             for r in results for s in r["promoted_steps"] if s["regression"]]
    return (f"**promoted regressions: {regression_count(results)}** across {len(results)} run(s)"
            + (f" ({'; '.join(named)})" if named else ""))


def outcomes(result: dict) -> str:
    """One line per run: what it learned from and what its training runs came to, with why the others failed."""
    statuses: dict[str, int] = {}
    why: list[str] = []
    for x in result["runs"]:
        statuses[x["status"]] = statuses.get(x["status"], 0) + 1
        if x["status"] != "promoted":
            reasons = [*(x.get("gate_reasons") or []), *([f"A/B: {x['ab']['reason']}"] if x.get("ab") else []),
                       *([x["error"]] if x.get("error") else [])]
            why += [reason for reason in reasons if reason not in why]
    # runs that ended past the gate's KL budget and were pulled back along their step (rlhf.kl_budget.fit_budget)
    pulled = [f"{x.get('candidate') or 'one'} to f {p['ppo/budget_scale']:.2f} ({p['ppo/budget_kl']:.1f} nats)"
              for x in result["runs"] if (p := x.get("policy") or {}).get("ppo/budget_scale", 1.0) < 1.0]
    users = result.get("users") or {}
    load = result.get("load") or {}
    loads = (f"; load average {load['start'][0]:.1f} at the start, {load['end'][0]:.1f} at the end"
             if load.get("start") and load.get("end") else "")
    return (f"- {result['name']} ({result['date']}{loads}; {result['elapsed_s'] / 60:.1f} min of learning, "
            f"{users.get('feedback_events', '?')} feedback events; {result['policies']['base']['n']} held-out "
            f"answers per policy): {len(result['runs'])} training run(s)"
            + (": " + ", ".join(f"{n} {status}" for status, n in statuses.items()) if statuses else "")
            + (f". Pulled back within the KL budget: {', '.join(pulled)}" if pulled else "")
            + (f". Not promoted because: {'; '.join(why)}" if why else ""))


def report(results: list[dict]) -> str:
    first = results[0]
    users = first["users_config"]
    notes = (
        f"Held-out: {first['heldout_prompts']} prompts × {first['samples']} answers that no simulated user ever "
        "sent, every policy on the same prompts and seeds, so two policies compare as a paired difference ± its "
        "standard error; a promoted regression is a promoted version more than 2 SE below its predecessor. Score: "
        "the users' preference (`vader`: mean VADER compound; `concise`: 1 - words/200 for an answer that ended by "
        "itself, -1 when cut off). KL: nats per answer to the base on the policy's own samples. Final gain: the "
        "last promoted version against the base (0 when nothing was promoted). Budget "
        f"{first['budget_s'] / 60:.0f} min or {first['generations']} promotions per run; users: "
        f"{users['concurrency']} at a time, {users['think_time_s']} s mean think time, noise {users['noise']}. "
        "Reward models: each run's, judged on base answers to the held-out prompts against the preference itself "
        "(bench/reward_eval.py); best-of-n: gain over the mean answer, picking by the RM / by the preference."
    )
    summaries = seed_summaries(results)
    return "\n\n".join([
        headline(results),
        "### Targets\n\n" + target_table(targets(results)),
        "### Mean and spread over seeds\n\n" + seed_table(summaries),
        "### Each run: last promoted version against the base\n\n" + run_table(results),
        "### Each promoted version against its predecessor\n\n" + version_table(results),
        "### Reward models against the preference\n\n" + reward_table(results),
        notes,
        "\n".join(outcomes(r) for r in results),
        "![learning curve](../docs/learning_curve.png)\n\n![reward curve](../docs/reward_curve.png)",
    ]) + "\n"


def write_report(results_dir: Path, command: str, docs: Path = DOCS) -> None:
    results = load_results(results_dir)
    if not results:
        raise SystemExit(f"no results in {results_dir} (loop-<algorithm>-<preference>-s<seed>.json)")
    plot_learning_curve(groups(results), docs / "learning_curve.png", TARGET_GAIN)
    plot_reward_curve(results, docs / "reward_curve.png", RM_ACCURACY, RM_VOTES)
    cores = "/".join(sorted({str(r["cores"]) for r in results}))
    devices = "/".join(sorted({str(r["settings"].get("device")) for r in results}))
    machine = f"{cores} cores, CHATLOOP_DEVICE={devices}; runs from {', '.join(r['date'] for r in results)}."
    write_results(LABEL, report(results), machine, command)
    print(headline(results).replace("**", ""))


if __name__ == "__main__":
    write_report(Path(__file__).with_name("results"), " ".join(["python -m bench.loop_report", *sys.argv[1:]]))
