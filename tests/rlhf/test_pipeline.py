"""PPO and evaluation with the reward model as an adapter of the policy's PeftModel: one copy of the
base weights, the same numbers as with a reward model on a base of its own, the reward model frozen."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from rlhf.config import EvalConfig, LoraSettings, PipelineConfig, PPOConfig
from rlhf.evaluate import compare
from rlhf.modeling import load_base
from rlhf.pipeline import (
    STATS_FILE,
    eval_models,
    evaluate_candidate,
    load_feedback,
    ppo_iterations,
    ppo_trainer,
    train_policy,
    train_reward,
    untrained_reason,
)
from rlhf.ppo import PPOTrainer
from rlhf.reward import RewardModel
from tests.models import make_adapter
from tests.rlhf.helpers import FAST, PROMPTS, answer_logprobs, make_reward_model

CONFIG = PPOConfig(
    batch_size=8, minibatch_size=4, epochs=1, lr=3e-3, max_new_tokens=8, temperature=0.7,
    missing_eos_penalty=None, lora=LoraSettings(r=8, alpha=16), precision="fp32",
)


@pytest.fixture(scope="module")
def feedback_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("feedback") / "feedback.jsonl"
    with path.open("w") as f:
        for i, prompt in enumerate(PROMPTS):
            pair = {"prompt": prompt, "chosen": [{"role": "assistant", "content": f"yes {i}"}],
                    "rejected": [{"role": "assistant", "content": f"no {i}"}]}
            f.write(json.dumps(pair) + "\n")
    return path


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir: Path, feedback_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rm") / "v1"
    return make_reward_model(tiny_model_dir, out, metadata={"data": str(feedback_file)})


def test_ppo_step_scores_with_the_policys_own_base(tiny_model_dir, reward_dir):
    """The reward model inside PPO reads the policy's base (adapter off): the same step as with a reward model
    on a base of its own, one copy of the weights instead of two, and the reference is still the bare base."""
    trainer, reward_model = ppo_trainer(reward_dir, tiny_model_dir, CONFIG)
    assert set(trainer.policy.peft_config) == {"default"}
    policy = {name: p.detach().clone() for name, p in trainer.policy.named_parameters() if p.requires_grad}
    base, tokenizer = load_base(tiny_model_dir)
    separate_trainer = PPOTrainer(base, tokenizer, None, CONFIG)
    separate_trainer.reward_fn = reward_model.reward_fn(load_base(tiny_model_dir)[0], tokenizer)
    torch.manual_seed(1)  # sampling and minibatch order draw from the global RNG
    separate = separate_trainer.step(PROMPTS[:8])
    torch.manual_seed(1)
    stats = trainer.step(PROMPTS[:8])
    assert stats["objective/raw_score"] != 0
    parts = [stats["time/generate_s"], stats["time/forward_s"], stats["time/score_s"]]
    assert min(parts) > 0 and sum(parts) <= stats["time/rollout_s"] and stats["time/update_s"] > 0
    for key in separate:
        if not key.startswith("time/"):
            assert stats[key] == pytest.approx(separate[key], rel=1e-5, abs=1e-6), key
    after = dict(trainer.policy.named_parameters())
    assert all(after[name].requires_grad for name in policy)
    assert any(not torch.equal(after[name], before) for name, before in policy.items())  # the policy did learn

    rollouts = trainer.sample(PROMPTS[:4])
    expected = answer_logprobs(load_base(tiny_model_dir)[0], rollouts.batch, CONFIG.temperature)
    torch.testing.assert_close(rollouts.ref_logprobs * rollouts.batch.response_mask, expected, atol=1e-5, rtol=1e-5)


def test_evaluation_scores_with_the_models_own_base(tiny_model_dir, reward_dir, feedback_file, tmp_path):
    candidate = make_adapter(tiny_model_dir, tmp_path / "cand", seed=3, b_std=0.05)
    current = make_adapter(tiny_model_dir, tmp_path / "cur", seed=4, b_std=0.05)
    model, _, _ = eval_models(reward_dir, tiny_model_dir, candidate, current)
    assert set(model.peft_config) == {"candidate", "current"}

    config = PipelineConfig(heldout_fraction=0.0, eval=EvalConfig(max_new_tokens=6, batch_size=4, precision="fp32"))
    result = evaluate_candidate(candidate, reward_dir, tiny_model_dir, config, current)
    prompts = load_feedback(feedback_file, 0.0).prompts  # no held-out side: all of them, in this order
    assert result["metrics"]["eval/prompts"] == len(PROMPTS) and isinstance(result["accepted"], bool)

    alone = RewardModel.load(reward_dir)
    base, tokenizer = load_base(tiny_model_dir)
    reward_fn = alone.reward_fn(load_base(tiny_model_dir)[0], tokenizer)
    separate = compare(base, tokenizer, reward_fn, prompts, candidate, current, config.eval)
    for key, value in separate.items():
        assert result["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("algorithm", ["dpo", "kto"])
def test_train_policy_runs_the_chosen_algorithm(algorithm, tiny_model_dir, reward_dir, feedback_file, tmp_path):
    """algorithm dpo|kto trains on the feedback itself (the reward model only judges later), from the parent."""
    parent = make_adapter(tiny_model_dir, tmp_path / "parent", seed=5, b_std=0.05)
    config = PipelineConfig(algorithm=algorithm, heldout_fraction=0.0)
    config.offline.max_answer_tokens, config.offline.precision = 16, "fp32"
    seen = []
    history = train_policy(reward_dir, tiny_model_dir, tmp_path / "cand", config, parent, feedback_file,
                           lambda stage, step, total, logs: seen.append((stage, step, total)))
    assert history and seen and seen[-1][0] == algorithm and seen[-1][1] == seen[-1][2]
    stats = json.loads((tmp_path / "cand" / STATS_FILE).read_text())
    assert stats["config"]["algorithm"] == algorithm
    assert sorted(p.name for p in (tmp_path / "cand").iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", STATS_FILE])
    trained = PeftModel.from_pretrained(load_base(tiny_model_dir)[0], tmp_path / "cand")
    start = PeftModel.from_pretrained(load_base(tiny_model_dir)[0], parent)
    weights = {n: p for n, p in trained.named_parameters() if "lora_B" in n}
    assert any(not torch.equal(p, dict(start.named_parameters())[n]) for n, p in weights.items())


def test_train_policy_rejects_an_unknown_algorithm(tiny_model_dir, reward_dir, feedback_file, tmp_path):
    with pytest.raises(ValueError, match="unknown algorithm"):
        train_policy(reward_dir, tiny_model_dir, tmp_path / "c", PipelineConfig(algorithm="sft"), None, feedback_file)


def test_train_reward_saves_the_model_and_its_metrics_and_reuses_the_features(
    tiny_model_dir, feedback_file, tmp_path
):
    config = PipelineConfig(reward=FAST, heldout_fraction=0.25)
    first = train_reward(feedback_file, tiny_model_dir, tmp_path / "rm1", config, cache_dir=tmp_path / "cache")
    assert first["reward/heldout_pairs"] > 0 and first["reward/cached_answers"] == 0
    assert first["reward/heldout_accuracy_low"] <= first["reward/heldout_accuracy"] <= first[
        "reward/heldout_accuracy_high"]
    saved = RewardModel.load(tmp_path / "rm1")
    assert saved.config == FAST
    second = train_reward(feedback_file, tiny_model_dir, tmp_path / "rm2", config, cache_dir=tmp_path / "cache")
    assert second["reward/cached_answers"] == second["reward/answers"]


def test_every_stage_loads_its_models_on_the_configured_device(
    tiny_model_dir, reward_dir, feedback_file, tmp_path, monkeypatch
):
    """CHATLOOP_DEVICE reaches every model a worker trains or scores (checked on the CPU: the device each stage
    asks load_base for is recorded)."""
    asked = []

    def recording_load_base(path, device="cpu", *args):
        asked.append(device)
        return load_base(path, "cpu", *args)

    monkeypatch.setattr("rlhf.pipeline.load_base", recording_load_base)
    config = PipelineConfig(device="cpu:0", reward=FAST, heldout_fraction=0.0,
                            eval=EvalConfig(max_new_tokens=4, batch_size=4, precision="fp32"))
    config.ppo = replace(CONFIG, iterations=1, batch_size=4, group_size=2, minibatch_size=4)
    config.offline.max_answer_tokens, config.offline.precision = 16, "fp32"
    train_reward(feedback_file, tiny_model_dir, tmp_path / "rm", config)
    train_policy(reward_dir, tiny_model_dir, tmp_path / "ppo", config, None, feedback_file)
    config.algorithm = "dpo"
    train_policy(reward_dir, tiny_model_dir, tmp_path / "dpo", config, None, feedback_file)
    evaluate_candidate(tmp_path / "ppo", reward_dir, tiny_model_dir, config, None, feedback_file)
    assert asked == ["cpu:0"] * 4


@pytest.mark.parametrize(("served", "metrics", "expected"), [
    (0, {}, 5),  # nothing served: fresh samples are all there is to train on
    (40, {"reward/heldout_accuracy_low": 0.51}, 5),
    (40, {"reward/heldout_accuracy_low": 0.50}, 1),  # at chance is not better than chance
    (40, {"reward/heldout_pairs": 0}, 1),  # no held-out pairs: nothing shows it is better than chance
])
def test_ppo_samples_fresh_answers_only_for_a_reward_model_better_than_chance(served, metrics, expected):
    assert ppo_iterations(PPOConfig(iterations=5), served, metrics) == expected
    assert ppo_iterations(PPOConfig(iterations=5, min_reward_accuracy=0), served, metrics) == 5


@pytest.mark.parametrize(("low", "iterations"), [(0.3, 1), (0.8, 3)])
def test_a_run_trains_on_served_answers_alone_when_its_reward_model_is_not_better_than_chance(
    low, iterations, tiny_model_dir, tmp_path
):
    served = tmp_path / "served.jsonl"
    origin = {"adapter": "base", "finish_reason": "stop", "temperature": 0.7, "top_p": 1.0}
    with served.open("w") as f:
        for i, prompt in enumerate(PROMPTS[:6]):
            pair = {"prompt": prompt, "chosen": [{"role": "assistant", "content": f"yes {i}"}],
                    "rejected": [{"role": "assistant", "content": f"no {i}"}],
                    **{f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in origin.items()}}
            f.write(json.dumps(pair) + "\n")
    reward_dir = make_reward_model(tiny_model_dir, tmp_path / "rm", metadata={
        "data": str(served), "metrics": {"reward/heldout_accuracy_low": low}})
    config = PipelineConfig(heldout_fraction=0.0)
    config.ppo = replace(CONFIG, iterations=3, batch_size=4, group_size=2, minibatch_size=4, served_batch=8,
                         served_step="contrast", max_kl=6.0)
    config.gate.max_kl = 0.5  # nearer than max_kl: the gate's budget reaches the contrast's stop
    config.eval.prompts = 5  # the gate's count: the run's end is measured on as many
    seen = []
    history = train_policy(reward_dir, tiny_model_dir, tmp_path / "cand", config, None, served,
                           lambda stage, step, total, stats: seen.append((step, total)), init_version="base")
    assert len(history) == iterations and seen[-1] == (iterations, iterations)
    assert history[0]["ppo/served"] == 8  # the 12 served answers' newest 8
    assert history[0]["ppo/kl_room"] == 0.5 and history[0]["ppo/start_kl"] == 0.0  # a fresh adapter is the base
    assert history[-1]["ppo/budget_answers"] == 5


def test_a_ppo_run_that_took_no_step_has_no_candidate_to_test():
    """The served iteration had no room (0 steps) and the fresh one stopped over max_kl (no steps key): untrained.
    One step anywhere, or another algorithm, is a candidate."""
    no_room = {"ppo/steps": 0.0, "ppo/start_kl": 12.97, "ppo/kl_room": 0.0}
    over = {"ppo/over_max_kl": 1.0, "objective/kl": 13.1}
    assert untrained_reason("ppo", [no_room, over], 12.0) == (
        "no training step: the starting policy is already 13.0 nats from the reference, with the gate's budget at 12")
    assert "at its KL budget" in untrained_reason("ppo", [over], 12.0)
    assert untrained_reason("ppo", [no_room, {"ppo/steps": 4.0}], 12.0) is None
    assert untrained_reason("ppo", [{"ppo/steps": 1.0, "ppo/start_kl": 3.0}], 12.0) is None
    assert untrained_reason("dpo", [], 12.0) is None
