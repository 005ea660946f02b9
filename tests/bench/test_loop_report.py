"""The learning benchmark's pure parts: promotion order, held-out evaluation, the table and the plot."""

from pathlib import Path

import pytest
import torch

from bench.loop import promotions
from bench.loop_eval import evaluate_policies, preference_reward
from bench.loop_report import plot, table
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


def result(algorithm: str, scores: list[float]) -> dict:
    policies = {"base": {"t": 0.0, "events": 0, "score": scores[0], "score_se": 0.05, "kl": 0.0, "length": 60.0,
                         "eos": 0.1, "rm_accuracy": None}}
    for i, score in enumerate(scores[1:], start=1):
        policies[f"v000{i}"] = {"t": 600.0 * i, "events": 150 * i, "score": score, "score_se": 0.04, "kl": 2.0 * i,
                                "length": 58.0, "eos": 0.1, "rm_accuracy": 0.8}
    return {
        "algorithm": algorithm, "preference": "vader", "seed": 0, "budget_s": 1800, "generations": 3,
        "heldout_prompts": 60, "samples": 2, "users_config": {"concurrency": 4, "think_time_s": 2.0, "noise": 0.1},
        "runs": [{"status": "promoted", "gate_reasons": []}, {"status": "rejected", "gate_reasons": ["worse"]}],
        "users": {"feedback_events": 400}, "timeline": [{"events": 10, "live_score": 0.4}, {"events": 50,
                                                                                              "live_score": 0.5}],
        "policies": policies,
    }


def test_table_gains_are_against_the_base():
    text = table([result("ppo", [0.45, 0.55, 0.70]), result("dpo", [0.45, 0.50])])
    summary = [line for line in text.splitlines() if line.startswith("| ppo | 2 |")]
    assert summary and "0.450 → 0.700 | +0.250 | 4.00 |" in summary[0] and "| 20.0 |" in summary[0]
    assert "| dpo | v0001 | 10.0 | 150 | 0.500 ± 0.040 | +0.050 | 2.00 |" in text
    assert "rejected (worse)" in text


def test_plot_writes_a_png(tmp_path: Path):
    path = tmp_path / "curve.png"
    plot([result("ppo", [0.45, 0.55, 0.70]), result("kto", [0.45, 0.47])], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
