"""PPO and evaluation with the reward model as an adapter of the policy's PeftModel: one copy of the
base weights, the same numbers as with a reward model on a base of its own, the reward model frozen."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from rlhf.config import EvalConfig, LoraSettings, PipelineConfig, PPOConfig
from rlhf.evaluate import compare
from rlhf.modeling import load_base
from rlhf.pipeline import (
    STATS_FILE,
    eval_models,
    evaluate_candidate,
    load_feedback,
    ppo_trainer,
    train_policy,
    train_reward,
)
from rlhf.ppo import PPOTrainer
from rlhf.reward import ADAPTER, RewardModel
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


def base_weights(*modules: torch.nn.Module) -> dict[int, torch.Tensor]:
    """The base's parameters reachable from these modules (LoRA and heads excluded), by storage address."""
    found = {}
    for module in modules:
        for name, param in module.named_parameters():
            if "lora_" not in name and "head" not in name:
                found[param.data_ptr()] = param
    return found


def test_ppo_holds_one_copy_of_the_base(tiny_model_dir, reward_dir):
    trainer, reward_model = ppo_trainer(reward_dir, tiny_model_dir, CONFIG)
    assert reward_model.body is trainer.policy and set(trainer.policy.peft_config) == {"default", ADAPTER}
    plain = load_base(tiny_model_dir)[0]
    shared = base_weights(trainer.policy, reward_model)
    assert len(shared) == len(base_weights(plain))
    assert sum(p.numel() for p in shared.values()) == sum(p.numel() for p in plain.parameters())
    # Every LoRA-wrapped linear layer holds the policy's and the reward model's adapters over one base weight.
    layers = [m for m in trainer.policy.modules() if isinstance(m, LoraLayer)]
    assert layers and all(set(m.lora_A) == {"default", ADAPTER} for m in layers)


def test_ppo_step_with_the_shared_reward_model(tiny_model_dir, reward_dir):
    trainer, reward_model = ppo_trainer(reward_dir, tiny_model_dir, CONFIG)
    frozen = {name: p.detach().clone() for name, p in reward_model.named_parameters() if f".{ADAPTER}." in name}
    frozen |= {f"head.{name}": p.detach().clone() for name, p in reward_model.head.named_parameters()}
    policy = {name: p.detach().clone() for name, p in trainer.policy.named_parameters() if p.requires_grad}
    assert policy and not any(f".{ADAPTER}." in name for name in policy)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in reward_model.parameters() if not p.requires_grad}

    # The same step as with a reward model on a base of its own (the design before this one).
    alone = RewardModel.load(reward_dir, load_base(tiny_model_dir)[0])
    base, tokenizer = load_base(tiny_model_dir)
    separate_trainer = PPOTrainer(base, tokenizer, alone.reward_fn(tokenizer), CONFIG)
    torch.manual_seed(1)  # sampling and minibatch order draw from the global RNG
    separate = separate_trainer.step(PROMPTS[:8])
    torch.manual_seed(1)
    stats = trainer.step(PROMPTS[:8])
    assert stats["objective/raw_score"] != 0
    parts = [stats["time/generate_s"], stats["time/forward_s"], stats["time/score_s"]]
    assert min(parts) > 0 and sum(parts) <= stats["time/rollout_s"] and stats["time/update_s"] > 0
    for key in separate:
        if not key.startswith("time/"):
            assert stats[key] == pytest.approx(separate[key], rel=1e-6, abs=1e-7), key

    for name, param in reward_model.named_parameters():
        if f".{ADAPTER}." in name:
            assert torch.equal(param, frozen[name]) and not param.requires_grad, name
    assert all(torch.equal(p, frozen[f"head.{n}"]) for n, p in reward_model.head.named_parameters())
    after = dict(trainer.policy.named_parameters())
    assert all(after[name].requires_grad for name in policy)
    assert any(not torch.equal(after[name], before) for name, before in policy.items())  # the policy did learn

    # The reference is still the bare base: every adapter, the reward model's too, off.
    rollouts = trainer.sample(PROMPTS[:4])
    expected = answer_logprobs(load_base(tiny_model_dir)[0], rollouts.batch, CONFIG.temperature)
    torch.testing.assert_close(rollouts.ref_logprobs * rollouts.batch.response_mask, expected, atol=1e-5, rtol=1e-5)


def test_evaluation_with_the_shared_reward_model(tiny_model_dir, reward_dir, feedback_file, tmp_path):
    candidate = make_adapter(tiny_model_dir, tmp_path / "cand", seed=3, b_std=0.05)
    current = make_adapter(tiny_model_dir, tmp_path / "cur", seed=4, b_std=0.05)
    model, _, reward_model = eval_models(reward_dir, tiny_model_dir, candidate, current)
    assert reward_model.body is model and set(model.peft_config) == {"candidate", "current", ADAPTER}
    assert len(base_weights(model, reward_model)) == len(base_weights(load_base(tiny_model_dir)[0]))

    config = PipelineConfig(heldout_fraction=0.0, eval=EvalConfig(max_new_tokens=6, batch_size=4, precision="fp32"))
    result = evaluate_candidate(candidate, reward_dir, tiny_model_dir, config, current)
    prompts = load_feedback(feedback_file, 0.0).prompts  # no held-out side: all of them, in this order
    assert result["metrics"]["eval/prompts"] == len(PROMPTS) and isinstance(result["accepted"], bool)

    alone = RewardModel.load(reward_dir, load_base(tiny_model_dir)[0])
    base, tokenizer = load_base(tiny_model_dir)
    separate = compare(base, tokenizer, alone.reward_fn(tokenizer), prompts, candidate, current, config.eval)
    for key, value in separate.items():
        assert result["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


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


def test_train_reward_warm_starts_and_falls_back_when_the_shape_changed(
    tiny_model_dir, reward_dir, feedback_file, tmp_path
):
    config = PipelineConfig(reward=FAST)  # rank 8, as reward_dir
    warm = train_reward(feedback_file, tiny_model_dir, tmp_path / "warm", config, init_reward=reward_dir)
    assert warm["reward/warm_start"] == 1.0
    config.reward = replace(FAST, lora=LoraSettings(r=4, alpha=8))  # the rank setting changed
    fresh = train_reward(feedback_file, tiny_model_dir, tmp_path / "fresh", config, init_reward=reward_dir)
    assert fresh["reward/warm_start"] == 0.0
    assert RewardModel.load(tmp_path / "fresh", load_base(tiny_model_dir)[0]).config.lora.r == 4
