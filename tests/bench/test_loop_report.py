"""The learning benchmark's pure parts: promotion order, held-out evaluation, and the report (tables, targets,
plots) from synthetic results with hand-computed figures."""

import json
import statistics
from pathlib import Path

import pytest
import torch

from bench.loop import promotions, regressions
from bench.loop_eval import evaluate_policies, preference_reward
from bench.loop_plots import band, plot_learning_curve, plot_reward_curve
from bench.loop_report import (
    RM_ACCURACY,
    RM_VOTES,
    TARGET_GAIN,
    Target,
    ppo_vader_targets,
    report,
    reward_accuracy_target,
    reward_table,
    run_table,
    seed_table,
    target_table,
    targets,
    version_table,
    versus_target,
)
from bench.loop_results import final, groups, load_results, seed_summaries
from rlhf.config import EvalConfig


def test_promotions_oldest_first_without_rollbacks():
    history = [  # registry history is newest first
        {"version": "v0003", "at": 30.0},
        {"version": "v0001", "at": 20.0, "rollback": True},
        {"version": "v0002", "at": 10.0},
        {"version": "v0001", "at": 5.0},
    ]
    assert [p["version"] for p in promotions(history)] == ["v0001", "v0002", "v0003"]


def test_preference_reward_reads_the_finish_from_eos():
    eos = {2}
    concise = preference_reward("concise", eos)
    ten_words = "one two three four five six seven eight nine ten."
    scores = concise([[], []], [ten_words, ten_words], [[5, 6, 2], [5, 6, 7]])
    assert scores.tolist() == pytest.approx([0.95, -1.0])  # 1 - 10/200 when it stopped; cut off: -1
    vader = preference_reward("vader", eos)
    assert vader([[]], ["I love this, it is wonderful!"], [[2]]).item() > 0.8


def test_evaluate_policies_on_one_base(tiny_model_dir: Path, tiny_adapter_dir: Path):
    torch.set_num_threads(1)
    config = EvalConfig(max_new_tokens=6, batch_size=8, precision="fp32")
    prompts = ["How do I boil an egg?", "What causes rain?", "Explain recursion."]
    results = evaluate_policies(tiny_model_dir, {"v0001": tiny_adapter_dir}, prompts, "vader", 2, config)
    assert list(results) == ["base", "v0001"]
    assert results["base"]["n"] == results["v0001"]["n"] == 6
    assert results["base"]["kl"] == pytest.approx(0.0, abs=1e-6)  # the base against itself
    assert results["v0001"]["kl"] > 0.01  # the random adapter moves the distribution
    for metrics in results.values():
        assert -1.0 <= metrics["score"] <= 1.0 and 0.0 <= metrics["eos"] <= 1.0 and 1 <= metrics["length"] <= 6


# Synthetic results with hand-computed figures: 4 held-out answers per policy, paired by index.
BASE = [-0.2, 0.0, 0.2, 0.3]  # mean 0.075, SE 0.111


def policy(scores: list[float], t: float, events: int, kl: float, length: float, eos: float) -> dict:
    return {"scores": scores, "score": statistics.fmean(scores), "score_se": statistics.stdev(scores) / 2,
            "kl": kl, "length": length, "eos": eos, "n": len(scores), "t": t, "events": events, "rm_accuracy": None}


def rm(run_id: str, votes: int, accuracy: tuple[float, float, float], captured4: float) -> dict:
    return {"run_id": run_id, "t": votes * 0.6, "events": votes, "votes": votes, "heldout_votes_accuracy": 0.7,
            "pair_accuracy": {"accuracy": accuracy[0], "low": accuracy[1], "high": accuracy[2], "pairs": 300},
            "best_of_2": {"reward_model": 0.05, "preference": 0.18, "captured": 0.05 / 0.18},
            "best_of_4": {"reward_model": 0.25 * captured4, "preference": 0.25, "captured": captured4},
            "best_of_16": {"reward_model": 0.1, "preference": 0.34, "captured": 0.1 / 0.34}}


def run_record(run_id: str, status: str, candidate: str | None, **extra) -> dict:
    return {"id": run_id, "status": status, "candidate": candidate, "created_t": 0.0, "finished_t": 1.0,
            "events_seen": 0, "reward_metrics": None, "policy": None, "gate_reasons": None, "gate_metrics": None,
            "ab": None, "error": None, **extra}


def make_result(algorithm: str, preference: str, seed: int, versions: list[dict], base: dict | None = None,
                runs: list[dict] | None = None, reward_models: list[dict] | None = None) -> dict:
    """versions: [{"version", "t", policy fields...}] in promotion order; promoted_steps from bench.loop's rule."""
    policies = {"base": base or policy(BASE, 0.0, 0, 0.0, 60.0, 0.10)}
    policies |= {v["version"]: v["policy"] for v in versions}
    order = ["base", *(v["version"] for v in versions)]
    return {
        "name": f"{algorithm}-{preference}-s{seed}", "algorithm": algorithm, "preference": preference, "seed": seed,
        "budget_s": 1800, "generations": 3, "date": "2026-12-01 10:00 UTC", "cores": 2, "settings": {"device": "cpu"},
        "users_config": {"concurrency": 8, "think_time_s": 1.0, "noise": 0.1}, "heldout_prompts": 2, "samples": 2,
        "eval_seconds": 10.0, "elapsed_s": 1800.0, "timeline": [],
        "promotions": [{"version": v["version"], "previous": None, "at": 0.0, "reason": "", "t": v["policy"]["t"]}
                       for v in versions],
        "users": {"feedback_events": 2000}, "runs": runs or [], "policies": policies,
        "promoted_steps": regressions(policies, order), "reward_models": reward_models or [],
    }


def ppo_seed0() -> dict:
    # v0001 +0.25 over base; v0002 -0.050 ± 0.029 below v0001 (1.7 SE: not a regression); last - base +0.200 ± 0.058
    return make_result("ppo", "vader", 0, [
        {"version": "v0001", "policy": policy([0.0, 0.3, 0.4, 0.6], 600.0, 700, 4.0, 58.0, 0.15)},
        {"version": "v0002", "policy": policy([-0.1, 0.3, 0.3, 0.6], 1200.0, 1500, 8.0, 50.0, 0.20)},
    ], runs=[
        run_record("a1", "promoted", "v0001", ab={"votes": 120, "win_rate": 0.6, "ci95": [0.52, 0.68],
                                                 "against": "base", "reason": "users prefer it: win rate 0.6"},
                   reward_metrics={"reward/answers": 200, "reward/cached_answers": 0, "reward/feature_seconds": 30.0}),
        run_record("a2", "rejected", None, gate_reasons=["KL to reference 17.30 nats is over the 12.0 budget"]),
        run_record("a3", "promoted", "v0002", policy={"ppo/budget_scale": 0.42, "ppo/budget_kl": 10.93},
                   reward_metrics={"reward/heldout_accuracy": 0.81,
                                                               "reward/heldout_accuracy_low": 0.74,
                                                               "reward/heldout_accuracy_high": 0.88,
                                                               "reward/answers": 500, "reward/cached_answers": 200,
                                                               "reward/feature_seconds": 45.0}),
    ], reward_models=[rm("a1", 700, (0.72, 0.65, 0.79), 0.4), rm("a3", 1400, (0.78, 0.72, 0.84), 0.64),
                      rm("a4", 2400, (0.85, 0.80, 0.90), 0.8)])


def ppo_seed1() -> dict:
    # v0002 is 0.100 ± 0.029 below v0001 (3.5 SE): one promoted regression; last - base +0.450 ± 0.000;
    # its length falls to 0.40 × the base's and its EOS rate 0.05 below
    return make_result("ppo", "vader", 1, [
        {"version": "v0001", "policy": policy([0.3, 0.6, 0.7, 0.9], 300.0, 400, 6.0, 40.0, 0.10)},
        {"version": "v0002", "policy": policy([0.25, 0.45, 0.65, 0.75], 1500.0, 1900, 10.0, 24.0, 0.05)},
    ], runs=[
        run_record("b2", "promoted", "v0002", ab={"votes": 220, "win_rate": 0.6, "ci95": [0.53, 0.67],
                                                 "against": "v0001", "reason": "users prefer it: win rate 0.6"},
                   reward_metrics={"reward/heldout_pairs": 1, "reward/heldout_accuracy": 0.0,
                                   "reward/heldout_accuracy_low": 0.0, "reward/heldout_accuracy_high": 0.0}),
    ], reward_models=[rm("b1", 1200, (0.76, 0.69, 0.83), 0.3), rm("b2", 2000, (0.8, 0.75, 0.85), 0.5)])


def ppo_concise() -> dict:
    # last - base: diffs [1.7, 0.1, 0.1, 0.1] = +0.500 ± 0.400, within 2 SE; EOS 0.75 -> 1.00
    return make_result("ppo", "concise", 0, [
        {"version": "v0001", "policy": policy([0.7, 0.6, 0.7, 0.8], 900.0, 1000, 3.0, 20.0, 1.0)},
    ], base=policy([-1.0, 0.5, 0.6, 0.7], 0.0, 0, 0.0, 40.0, 0.75))


def kto_nothing_promoted() -> dict:
    return make_result("kto", "vader", 0, [], runs=[run_record("k1", "failed", None, error="train: boom")])


def rows(text: str, first_cell: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]


def test_final_gain_is_the_paired_difference_of_the_last_version():
    f = final(ppo_seed0())
    assert (f.version, f.kl, f.regressions) == ("v0002", 8.0, 0)
    assert f.gain == pytest.approx(0.2) and f.gain_se == pytest.approx(0.1 / 3**0.5)  # sd 0.2 / √3 over √4
    assert f.length_ratio == pytest.approx(50 / 60) and f.eos_change == pytest.approx(0.1)
    nothing = final(kto_nothing_promoted())
    assert (nothing.version, nothing.gain, nothing.gain_se, nothing.kl, nothing.length_ratio) == ("base", 0, 0, 0, 1)
    assert final(ppo_seed1()).regressions == 1  # 3.5 SE below its predecessor


def test_tables_carry_the_hand_computed_figures():
    results = [ppo_seed0(), ppo_seed1(), ppo_concise(), kto_nothing_promoted()]
    text = report(results)
    assert "**promoted regressions: 1** across 4 run(s) (ppo-vader-s1 v0002 -0.100 ± 0.029 vs v0001)" in text
    # per run: runs started, the machine's pace (75 s of features for the 200 + 300 answers not cached: 0.15 s),
    # base -> last with SEs, the paired last - base, KL, length, EOS, regressions
    assert rows(run_table(results), "ppo-vader-s0") == [
        "| ppo-vader-s0 | 3 | 0.15 | 2 | 20.0 | 0.075 ± 0.111 → 0.275 ± 0.144 | +0.200 ± 0.058 | 8.00 | 60.0 → 50.0 "
        "| 0.10 → 0.20 | 0 |"]
    assert "| ppo-vader-s1 | 1 | – | 2 | 25.0 | 0.075 ± 0.111 → 0.525 ± 0.111 | +0.450 ± 0.000 | 10.00 |" in text
    assert "| kto-vader-s0 | 1 | – | 0 | – | 0.075 ± 0.111 → 0.075 ± 0.111 | +0.000 ± 0.000 | 0.00 |" in text
    # per version: the step against its predecessor, the A/B that promoted it, the run's RM on held-out votes
    versions = version_table(results)
    assert ("| ppo-vader-s0 | v0001 | 10.0 | 700 | 0.325 ± 0.125 | +0.250 ± 0.029 vs base | 4.00 | 58.0 | 0.15 "
            "| 120 votes, 0.60 [0.52, 0.68]: users prefer it | – |") in versions
    assert "| ppo-vader-s0 | v0002 | 20.0 | 1500 | 0.275 ± 0.144 | -0.050 ± 0.029 vs v0001 | 8.00 |" in versions
    assert "| 0.81 [0.74, 0.88] |" in rows(versions, "ppo-vader-s0")[2]
    assert "| -0.100 ± 0.029 vs v0001 **regression** | 10.00 | 24.0 | 0.05 | 220 votes" in versions
    assert rows(versions, "ppo-vader-s1")[2].endswith("| 0.00 [0.00, 0.00], 1 pair |")  # one held-out pair, misordered
    assert rows(versions, "kto-vader-s0") == ["| kto-vader-s0 | base | 0.0 | 0 | 0.075 ± 0.111 | – | 0.00 | 60.0 "
                                              "| 0.10 | – | – |"]
    # over seeds: mean of +0.200 and +0.450, their range, mean KL of 8 and 10, one regression
    seeds = seed_table(seed_summaries(results))
    assert "| ppo | vader | 0, 1 | +0.325 | +0.200 to +0.450 | 9.00 | 1 |" in seeds
    assert "| kto | vader | 0 | +0.000 | +0.000 to +0.000 | 0.00 | 0 |" in seeds
    # reward models: votes, accuracy [interval], best-of-n RM / preference (captured)
    assert ("| ppo-vader-s0 | a3 | 14.0 | 1,400 | 0.78 [0.72, 0.84] (300 pairs) | +0.160 / +0.250 (64 %) "
            "| +0.100 / +0.340 (29 %) | 0.81 [0.74, 0.88] |") in reward_table(results)
    # what each run's training runs came to, and why the unpromoted ones were not
    assert ("3 training run(s): 2 promoted, 1 rejected. Pulled back within the KL budget: v0002 to f 0.42 (10.9 "
            "nats). Not promoted because: KL to reference 17.30 nats") in text
    assert "4 held-out answers per policy): 1 training run(s): 1 promoted\n" in text
    assert "1 training run(s): 1 failed. Not promoted because: train: boom\n" in text


def test_targets_met_missed_and_not_run():
    table = target_table(targets([ppo_seed0(), ppo_seed1(), ppo_concise(), kto_nothing_promoted()]))
    status = {line.split(" | ")[0].removeprefix("| "): line.split(" | ")[1:] for line in table.splitlines()[2:]}

    def find(prefix: str) -> list[str]:
        (key,) = [k for k in status if k.startswith(prefix)]
        return status[key]

    assert find("PPO, vader users: held-out gain") == [
        "+0.325 (s0 +0.200 ± 0.058, s1 +0.450 ± 0.000)", "met |"]
    assert find("PPO, vader users: at ≤ 12") == ["9.00 nats", "met |"]
    assert find("PPO, vader users: no length collapse") == ["0.40 × base (lowest)", "missed: 0.10 × base short |"]
    assert find("PPO, vader users: EOS") == ["-0.05 (lowest change)", "missed: 0.05 below the base |"]
    assert find("PPO, concise users: held-out concise") == [
        "+0.500 ± 0.400", "missed: 0.300 short of 2 SE above the base |"]
    assert find("PPO, concise users: EOS") == ["+0.25", "met |"]
    assert find("PPO ≥ DPO") == ["–", "not run (dpo-vader) |"]
    # ppo-vader-s0's pace: (30 + 45) s over (200 - 0) + (500 - 200) answers = 0.15; s1 and kto measured none
    assert find("PPO ≥ KTO") == [
        "PPO +0.325 vs KTO +0.000 (machine pace, RM features s an answer: 0.15 vs –)", "met |"]
    # the best RM at <= 1,500 votes across vader runs: a3 (b1's lower bound 0.69 misses, a4 has too many votes)
    assert find("Reward model") == ["0.78 [0.72, 0.84] at 1,400 votes (ppo-vader-s0, run a3)", "met |"]
    assert find("Best-of-4") == ["65 % (ppo-vader-s0 80 %, ppo-vader-s1 50 %)", "met |"]
    assert find("0 promoted regressions") == ["1 in 4 run(s)", "missed: 1 promoted regression(s) |"]


def test_a_comparison_across_machines_of_another_pace_says_so():
    """The budget is wall-clock: a rival measured on a machine more than twice as slow does not compare."""
    def paced(result: dict, seconds: float) -> dict:  # one reward stage: seconds over 100 answers
        record = run_record("p", "rejected", None, reward_metrics={"reward/answers": 100, "reward/feature_seconds":
                                                                   seconds})
        return result | {"runs": [record]}

    slow_dpo = paced(make_result("dpo", "vader", 0, []), 45.0)  # 0.45 s an answer
    ppo = [paced(ppo_seed0(), 7.0), paced(ppo_seed1(), 18.0)]  # 0.07 and 0.18: a mean pace of 0.125
    def versus(results: list[dict]) -> Target:
        return versus_target({(x.algorithm, x.preference): x for x in seed_summaries(results)}, groups(results), "dpo")

    far = versus([*ppo, slow_dpo])
    assert far.measured == "PPO +0.325 vs DPO +0.000 (machine pace, RM features s an answer: 0.07-0.18 vs 0.45)"
    assert far.status == "met, but on machines more than 2× apart in pace: not one comparison"  # 0.45 / 0.125
    near = versus([*ppo, paced(make_result("dpo", "vader", 0, []), 24.0)])  # 0.24 / 0.125
    assert near.status == "met"
    # the mean paces decide, not the nearest runs: 0.30 is within 2x of seed 1's 0.18, not of the mean 0.125
    between = versus([*ppo, paced(make_result("dpo", "vader", 0, []), 30.0)])
    assert between.status.startswith("met, but on machines more than 2× apart")


def test_the_gain_target_names_how_many_seeds_it_averages():
    """Two seeds are the issue's minimum; a third joins the mean, and the target's name says so."""
    seed2 = ppo_seed1() | {"seed": 2}
    (two, *_), (three, *_) = ppo_vader_targets([ppo_seed0(), ppo_seed1()]), ppo_vader_targets(
        [ppo_seed0(), ppo_seed1(), seed2])
    assert two.name.endswith("mean of 2 seeds") and three.name.endswith("mean of the seeds (at least 2)")
    assert three.measured == "+0.367 (s0 +0.200 ± 0.058, s1 +0.450 ± 0.000, s2 +0.450 ± 0.000)"


def test_missing_runs_are_not_run_never_met():
    seed1 = ppo_seed1()
    seed1["promoted_steps"] = [s | {"regression": False} for s in seed1["promoted_steps"]]
    assert [t.status for t in targets([seed1])] == [
        *["not run (1 of 2 seeds)"] * 4, "not run", "not run", "not run (dpo-vader)", "not run (kto-vader)",
        "missed: none reached it; best lower bound 0.01 short",  # b1 at 1,200 votes: 0.76 [0.69, 0.83]
        "missed: 10 points short",  # b2, its last reward model, captures 50 %
        "not run: ppo-vader-s0, ppo-concise-s0, dpo-vader-s0, kto-vader-s0",  # no regression, but not every run
    ]
    late = ppo_seed1()
    late["reward_models"] = [rm("b9", 1600, (0.9, 0.85, 0.95), 0.9)]
    assert reward_accuracy_target([late]).status == "missed: no reward model judged at ≤ 1,500 votes"
    assert reward_accuracy_target([ppo_concise()]).status == "not run"


def test_band_is_the_mean_and_range_of_the_seeds_step_curves():
    # seed 0: 0.075, then 0.325 at 10 min, 0.275 at 20; seed 1: 0.075, 0.625 at 5 min, 0.525 at 25; both end at 30
    minutes, mean, low, high = band([ppo_seed0(), ppo_seed1()])
    assert minutes == [0.0, 5.0, 10.0, 20.0, 25.0, 30.0]
    assert mean == pytest.approx([0.075, 0.35, 0.475, 0.45, 0.4, 0.4])
    assert low == pytest.approx([0.075, 0.075, 0.325, 0.275, 0.275, 0.275])
    assert high == pytest.approx([0.075, 0.625, 0.625, 0.625, 0.525, 0.525])


def test_plots_are_written(tmp_path: Path):
    results = [ppo_seed0(), ppo_seed1(), ppo_concise(), kto_nothing_promoted()]
    plot_learning_curve(groups(results), tmp_path / "learning.png", TARGET_GAIN)
    plot_reward_curve(results, tmp_path / "reward.png", RM_ACCURACY, RM_VOTES)
    for name in ("learning.png", "reward.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["learning.png", "reward.png"]  # no temporary left


def test_results_of_the_previous_format_are_ignored(tmp_path: Path, capsys: pytest.CaptureFixture):
    (tmp_path / "loop-ppo.json").write_text(json.dumps({"algorithm": "ppo", "policies": {}}))
    for result in (kto_nothing_promoted(), ppo_concise(), ppo_seed1(), ppo_seed0()):
        (tmp_path / f"loop-{result['name']}.json").write_text(json.dumps(result))
    loaded = load_results(tmp_path)
    assert [r["name"] for r in loaded] == ["ppo-vader-s0", "ppo-vader-s1", "ppo-concise-s0", "kto-vader-s0"]
    assert "ignoring loop-ppo.json" in capsys.readouterr().out
