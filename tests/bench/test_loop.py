"""The learning benchmark end to end on the tiny model: `chatloop up`, simulated users with keys of their own,
beat-started DPO runs through the real worker, a promotion, then the held-out evaluation of base and promoted
version as paired scores, and the run's reward model judged against the preference."""

from pathlib import Path

from bench.loop import LoopConfig, run_variant
from bench.users import UserConfig
from rlhf.config import EvalConfig
from tests.server import ACCEPT_ALL, TRAINING

TINY = TRAINING | ACCEPT_ALL | {
    "CHATLOOP_DTYPE": "float32", "CHATLOOP_MAX_CONTEXT": "256", "CHATLOOP_RETRAIN_EVERY_S": "2",
    "CHATLOOP_TRAIN_THREADS": "1",
}


def test_one_generation_learned_promoted_and_evaluated(tiny_model_dir: Path, tmp_path: Path):
    config = LoopConfig(
        work_dir=tmp_path, budget_s=240, generations=1,
        users=UserConfig(concurrency=2, max_tokens=8, think_time_s=0.2),
        eval_prompts=3, samples=2, eval=EvalConfig(max_new_tokens=6, batch_size=8, precision="fp32"), env=TINY,
        reward_answers=4,
    )
    result = run_variant("dpo", "vader", 0, config, tiny_model_dir)

    assert [p["version"] for p in result["promotions"]] == ["v0001"]
    assert result["elapsed_s"] < 240  # stopped at the promotion, not at the budget
    run = next(r for r in result["runs"] if r["candidate"] == "v0001")
    assert run["status"] == "promoted" and run["events_seen"] >= 6
    assert set(result["policies"]) == {"base", "v0001"}
    assert result["policies"]["v0001"]["events"] == run["events_seen"]
    # k1 on a handful of samples can come out slightly negative; the base against itself is exactly 0
    assert result["policies"]["base"]["kl"] == 0.0 != result["policies"]["v0001"]["kl"]
    assert result["users"]["feedback_events"] >= run["events_seen"]
    assert result["timeline"] and result["timeline"][-1]["events"] >= run["events_seen"]
    assert result["name"] == "dpo-vader-s0" and len(result["policies"]["v0001"]["scores"]) == 3 * 2
    [step] = result["promoted_steps"]
    assert step["version"] == "v0001" and step["previous"] == "base" and step["se"] >= 0
    judged = result["reward_models"]
    assert judged and all(0 <= r["pair_accuracy"]["accuracy"] <= 1 and "best_of_4" in r for r in judged)
