"""PPO on the tiny random Llama: it learns a synthetic reward, the reference is the bare base, adapters round-trip."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from rlhf.config import LoraSettings, PPOConfig
from rlhf.data import Served
from rlhf.modeling import TokenBatch, load_base
from rlhf.ppo import PPOTrainer, own_distance
from rlhf.rollout import Rollouts, cut_at_eos
from service.engine.model import resolve_base_model
from service.settings import Settings
from tests.models import make_adapter
from tests.rlhf.helpers import PROMPTS, answer_logprobs, six_comparisons, tiny_config

STAT_KEYS = {
    "objective/score", "objective/kl", "objective/kl_coef", "objective/entropy", "ppo/loss/policy", "ppo/loss/value",
    "ppo/policy/approx_kl", "ppo/policy/clipfrac", "ppo/val/clipfrac", "ppo/val/explained_variance",
    "ppo/mean_length", "ppo/eos_fraction", "time/rollout_s", "time/update_s",
}


@pytest.fixture
def tiny_base(tiny_model_dir: Path):
    """A fresh tiny base per test (the trainer wraps it in place)."""
    return load_base(tiny_model_dir)


def family_reward(model: torch.nn.Module):
    """+1 per answer token whose (tied) embedding has a positive first coordinate.

    A random tiny model's logits are nearly flat and can only move along directions of the embedding
    matrix, so a family that is such a direction is one it can learn; temperature 0.1 sharpens the
    logits enough for that to show within a few iterations. About half the vocabulary is in the family.
    """
    family = model.get_input_embeddings().weight[:, 0] > 0

    def reward_fn(prompts: list, texts: list[str], answer_ids: list[list[int]]) -> torch.Tensor:
        return torch.tensor([float(family[torch.tensor(ids)].sum()) for ids in answer_ids])

    return reward_fn


# The k3 loss term pulls harder than the same coefficient in the reward on this sharp (T=0.1) toy
@pytest.mark.parametrize(
    ("critic", "kl_penalty", "kl_coef"), [(True, "reward", 0.05), (False, "reward", 0.05), (False, "loss", 0.01)]
)
def test_ppo_raises_the_reward_within_a_kl_budget(tiny_base, critic, kl_penalty, kl_coef):
    base, tokenizer = tiny_base
    config = tiny_config(critic=critic, kl_penalty=kl_penalty, kl_coef=kl_coef, group_size=1 if critic else 2)
    trainer = PPOTrainer(base, tokenizer, family_reward(base), config)
    seen = []
    history = trainer.train(PROMPTS, iterations=8, progress=lambda i, stats: seen.append(i))
    assert seen == list(range(1, 9))
    if critic:
        assert set(history[0]) >= STAT_KEYS
    else:
        assert trainer.value_head is None
        assert set(history[0]) >= STAT_KEYS - {"ppo/loss/value", "ppo/val/clipfrac", "ppo/val/explained_variance"}
        assert not any(key.startswith("ppo/val") for key in history[0])
    assert ("ppo/loss/kl" in history[0]) == (kl_penalty == "loss")
    assert all(math.isfinite(value) for stats in history for value in stats.values())
    scores = [stats["objective/score"] for stats in history]
    kls = [stats["objective/kl"] for stats in history]
    print("scores", [round(s, 3) for s in scores], "kl", [round(k, 3) for k in kls])
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # a fresh adapter starts as the reference
    assert sum(scores[-3:]) / 3 > scores[0] + 1.5  # out of 8 tokens; starts near 2.6-3.2
    assert max(kls) < 5.0  # nats per answer


def test_a_run_stops_before_training_on_a_batch_past_its_kl_budget(tiny_base):
    """max_kl bounds the run, not one iteration: a fresh batch whose samples put the policy more than max_kl nats
    from the reference is not trained on, and no iteration follows it."""
    base, tokenizer = tiny_base
    trainer = PPOTrainer(base, tokenizer, family_reward(base), tiny_config(max_kl=1e-3))
    snapshots = []

    def snapshot(iteration: int, stats: dict) -> None:
        snapshots.append({n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad})

    history = trainer.train(PROMPTS, iterations=8, progress=snapshot)
    assert 2 <= len(history) < 8
    assert history[-1]["ppo/over_max_kl"] == 1.0
    assert history[-1]["objective/kl"] > 1e-3
    assert all(stats["objective/kl"] <= 1e-3 and "ppo/over_max_kl" not in stats for stats in history[:-1])
    assert all(torch.equal(snapshots[-1][n], p) for n, p in snapshots[-2].items())  # the last batch: no step


def test_reference_is_the_bare_base_and_the_policy_starts_as_the_adapter(tiny_base, tiny_model_dir, tmp_path):
    base, tokenizer = tiny_base
    adapter_dir = make_adapter(tiny_model_dir, tmp_path / "prod", seed=3)
    trainer = PPOTrainer(base, tokenizer, family_reward(base), tiny_config(), init_adapter_dir=adapter_dir)
    rollouts = trainer.sample(PROMPTS[:4])
    mask = rollouts.batch.response_mask

    plain_base, _ = load_base(tiny_model_dir)
    expected_ref = answer_logprobs(plain_base, rollouts.batch, trainer.config.temperature)
    torch.testing.assert_close(rollouts.ref_logprobs * mask, expected_ref, atol=1e-5, rtol=1e-5)

    production = PeftModel.from_pretrained(load_base(tiny_model_dir)[0], adapter_dir).eval()
    expected_policy = answer_logprobs(production, rollouts.batch, trainer.config.temperature)
    torch.testing.assert_close(rollouts.logprobs * mask, expected_policy, atol=1e-5, rtol=1e-5)
    assert (expected_policy - expected_ref).abs().max() > 0.1  # the adapter really changes the model


def test_a_fresh_adapter_is_the_reference_until_its_first_update(tiny_base, tiny_model_dir):
    """A fresh adapter leaves the base's outputs unchanged (its B matrices are 0), so recompute() skips the
    reference's forward pass until the first optimiser step, and from then on computes it again."""
    base, tokenizer = tiny_base
    trainer = PPOTrainer(base, tokenizer, family_reward(base), tiny_config())
    assert trainer.at_reference
    rollouts = trainer.sample(PROMPTS[:4])
    mask = rollouts.batch.response_mask
    expected_ref = answer_logprobs(load_base(tiny_model_dir)[0], rollouts.batch, trainer.config.temperature)
    torch.testing.assert_close(rollouts.ref_logprobs * mask, expected_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rollouts.logprobs, rollouts.ref_logprobs, atol=0, rtol=0)

    trainer.step(PROMPTS[:4])
    assert not trainer.at_reference
    moved = trainer.recompute(rollouts.prompts, rollouts.answer_ids, rollouts.batch)
    torch.testing.assert_close(moved.ref_logprobs * mask, expected_ref, atol=1e-5, rtol=1e-5)  # still the base
    assert ((moved.logprobs - moved.ref_logprobs) * mask).abs().max() > 0  # the policy moved away from it


def test_bf16_precision_runs_the_forward_under_autocast(tiny_base):
    """bf16 logprobs are close to fp32's but not equal: the autocast really applies (and only to the forward)."""
    base, tokenizer = tiny_base
    trainer = PPOTrainer(base, tokenizer, family_reward(base), tiny_config())
    answer_ids, batch = trainer.generate(PROMPTS[:4])
    fp32 = trainer.recompute(PROMPTS[:4], answer_ids, batch)
    trainer.config.precision = "bf16"
    bf16 = trainer.recompute(PROMPTS[:4], answer_ids, batch)
    mask = batch.response_mask.bool()
    difference = (fp32.logprobs - bf16.logprobs)[mask].abs()
    assert 0 < difference.max() < 0.25
    assert bf16.logprobs.dtype == bf16.values.dtype == torch.float32  # losses and heads stay fp32


def test_sampler_and_trainer_use_the_same_temperature(tiny_base):
    base, tokenizer = tiny_base
    trainer = PPOTrainer(base, tokenizer, family_reward(base), tiny_config(batch_size=32))
    rollouts = trainer.sample(PROMPTS * 3)
    mask = rollouts.batch.response_mask.bool()
    # Tokens drawn from p have mean -log p equal to p's entropy. Here that is 6.2 nats per token, give or
    # take 0.3 (the spread of the mean over ~290 tokens); tokens sampled at T=1 but scored at T=0.1 are
    # 5 nats further off.
    surprise = -rollouts.logprobs[mask].mean()
    assert surprise.item() == pytest.approx(rollouts.entropy[mask].mean().item(), abs=1.5)


def test_answers_without_eos_get_the_penalty(tiny_base):
    base, tokenizer = tiny_base
    trainer = PPOTrainer(base, tokenizer, family_reward(base), tiny_config(missing_eos_penalty=-1.0, epochs=1))
    stats = trainer.step(PROMPTS[:8])
    # a random model over 49k tokens essentially never samples EOS within 8 tokens
    assert stats["ppo/eos_fraction"] == 0.0 and stats["ppo/mean_length"] == 8.0
    assert stats["objective/score"] == -1.0 and stats["objective/raw_score"] > 0


def test_cut_at_eos():
    assert cut_at_eos([5, 6, 2, 2, 2], {2}) == [5, 6, 2]
    assert cut_at_eos([5, 6, 7], {2}) == [5, 6, 7]
    assert cut_at_eos([5, 0, 6, 2], {2, 0}) == [5, 0]


def test_saved_adapter_is_peft_safetensors_and_reloads(tiny_base, tiny_model_dir, tmp_path):
    base, tokenizer = tiny_base
    trainer = PPOTrainer(base, tokenizer, family_reward(base), tiny_config(epochs=1))
    trainer.step(PROMPTS[:8])
    out = trainer.save_adapter(tmp_path / "v2")
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)
    assert [p.name for p in tmp_path.iterdir()] == ["v2"]  # no temp dir left behind

    rollouts = trainer.sample(PROMPTS[:4])
    reloaded = PeftModel.from_pretrained(load_base(tiny_model_dir)[0], out).eval()
    expected = answer_logprobs(reloaded, rollouts.batch, trainer.config.temperature)
    torch.testing.assert_close(rollouts.logprobs * rollouts.batch.response_mask, expected, atol=1e-5, rtol=1e-5)
    assert (expected - answer_logprobs(load_base(tiny_model_dir)[0], rollouts.batch, 0.1)).abs().max() > 0

    with pytest.raises(OSError):  # a saved version is never overwritten
        trainer.save_adapter(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v2"]


@pytest.mark.real_model
def test_one_iteration_on_smollm2(tmp_path):
    base, tokenizer = load_base(resolve_base_model(Settings(data_dir=tmp_path)))

    def letter_e(prompts: list, texts: list[str], answer_ids: list[list[int]]) -> torch.Tensor:
        return torch.tensor([float(text.lower().count("e")) for text in texts])

    # most SmolLM2 answers run past 16 tokens: without the EOS penalty the reward itself drives the update
    config = PPOConfig(
        batch_size=4, group_size=1, minibatch_size=2, max_new_tokens=16, temperature=0.7, missing_eos_penalty=None,
        critic=True, kl_penalty="reward", lora=LoraSettings(r=8, alpha=16),  # every part: the value head too
    )
    stats = PPOTrainer(base, tokenizer, letter_e, config).step(PROMPTS[:4])
    print(stats)
    assert set(stats) >= STAT_KEYS
    assert all(math.isfinite(value) for value in stats.values())
    assert 1 <= stats["ppo/mean_length"] <= 16


def test_served_answers_make_the_first_batch_with_their_ends_kept(tiny_base):
    """Answers the starting policy served are exact samples of it: the first iteration trains on them (no
    generation), each baselined on the other answers to its conversation, EOS kept only where it stopped."""
    base, tokenizer = tiny_base
    trainer = PPOTrainer(base, tokenizer, family_reward(base), tiny_config())
    eos = tokenizer.eos_token_id
    assert trainer.served_ids(Served(PROMPTS[0], "hello world", ended=True, vote=1.0))[-1] == eos
    cut = trainer.served_ids(Served(PROMPTS[0], "hello world", ended=False, vote=1.0))
    assert cut and eos not in cut
    ids, _ = trainer.generate(PROMPTS[:6] * 2)  # two samples of each of six prompts
    served = [Served(p, tokenizer.decode(x, skip_special_tokens=True), bool(x) and x[-1] == eos, 1.0 - 2 * (i >= 6))
              for i, (p, x) in enumerate(zip(PROMPTS[:6] * 2, ids, strict=True))]
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}
    calls = []
    trainer.step = lambda prompts: calls.append(prompts) or {"fresh": 1.0}  # count the fresh iterations
    history = trainer.train(PROMPTS, 3, served=served)
    assert history[0]["ppo/served"] == 12 and history[0]["ppo/batch"] == 12 and history[0]["time/generate_s"] == 0
    assert history[0]["ppo/served_on_policy"] == 12
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # served by the starting policy itself
    assert history[0]["objective/score"] == 0.0  # the votes themselves (+1 six times, -1 six times) are the scores
    assert len(calls) == 2 and history[1:] == [{"fresh": 1.0}] * 2
    after = dict(trainer.policy.named_parameters())
    assert any(not torch.equal(after[n], p) for n, p in before.items())


@pytest.mark.parametrize("keep_groups", [True, False])
def test_minibatch_groups_keep_a_conversations_served_answers_in_one_step(tiny_base, monkeypatch, keep_groups):
    """With minibatch_groups each gradient step of the clipped served step holds whole conversations: both answers
    to a prompt, never one."""
    import rlhf.ppo

    base, tokenizer = tiny_base
    config = tiny_config(minibatch_size=3, epochs=2, minibatch_groups=keep_groups, served_step="clipped")
    trainer = PPOTrainer(base, tokenizer, None, config)
    served = six_comparisons()
    steps = []

    def spy(n, size, groups=None):
        batches = rlhf.ppo_math.minibatches(n, size, groups)
        steps.extend(sorted(i % 6 for i in batch.tolist()) for batch in batches)  # answer i is to prompt i % 6
        return batches

    monkeypatch.setattr(rlhf.ppo, "minibatches", spy)
    torch.manual_seed(0)
    trainer.train(PROMPTS, 1, served=served)
    whole = [len(step) == 2 and step[0] == step[1] for step in steps]
    if keep_groups:
        assert len(steps) == 12 and all(whole)  # 6 conversations of 2 in steps of at most 3, twice
    else:
        assert [len(step) for step in steps] == [3, 3, 3, 3] * 2 and not all(whole)


def test_recomputing_in_chunks_gives_the_numbers_of_one_pass(tiny_base):
    """recompute() runs batch_size rows at a time; a batch of 12 answers in chunks of 4 and of 16 agree."""
    base, tokenizer = tiny_base
    trainer = PPOTrainer(base, tokenizer, lambda p, t, ids: torch.zeros(len(ids)), tiny_config(critic=True))
    torch.manual_seed(0)
    answer_ids, batch = trainer.generate(PROMPTS[:12])
    whole = trainer.recompute(PROMPTS[:12], answer_ids, batch)
    trainer.config = tiny_config(critic=True, batch_size=4, minibatch_size=4)
    chunked = trainer.recompute(PROMPTS[:12], answer_ids, batch)
    for name in ("logprobs", "ref_logprobs", "values", "entropy"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), atol=1e-5, rtol=1e-5)
    assert whole.logprobs.shape == (12, batch.response_mask.shape[1])


def test_step_shape_contrast_takes_dpos_shape_on_served_answers_only():
    """served_step "contrast": minibatch_size comparisons (2x answers) a step, groups together, one pass, no clip, no
    KL term, for the served iteration; fresh iterations and "clipped" keep the config's own shape."""
    from rlhf.ppo import StepShape, step_shape

    config = tiny_config(minibatch_size=8, epochs=2, cliprange=0.2, served_step="contrast", max_kl=6.0)
    assert step_shape(config, 0.05, served=True) == StepShape(16, True, 1, float("inf"), 0.0, 6.0)
    assert step_shape(config, 0.05) == StepShape(8, False, 2, 0.2, 0.05)  # fresh: max_kl is checked on samples
    assert step_shape(replace(config, max_kl=0), 0.05, served=True).max_kl == float("inf")  # 0: never
    clipped = tiny_config(minibatch_size=8, epochs=2, cliprange=0.2, served_step="clipped")
    assert step_shape(clipped, 0.05, served=True) == StepShape(8, False, 2, 0.2, 0.05)


def test_contrast_served_step_takes_one_pass_of_whole_conversations(tiny_base, monkeypatch):
    """The contrast step on 12 served answers to 6 conversations, minibatch_size 2 (comparisons): 3 steps of 2 whole
    conversations each, once; no clip (clipfrac 0) and no KL term in the loss, however far the step moves."""
    import rlhf.ppo

    base, tokenizer = tiny_base
    config = tiny_config(minibatch_size=2, epochs=4, lr=5e-2, served_step="contrast", minibatch_groups=False, max_kl=0)
    trainer = PPOTrainer(base, tokenizer, None, config)
    served = six_comparisons()
    steps = []

    def spy(n, size, groups=None):
        batches = rlhf.ppo_math.minibatches(n, size, groups)
        steps.extend(sorted(i % 6 for i in batch.tolist()) for batch in batches)
        return batches

    monkeypatch.setattr(rlhf.ppo, "minibatches", spy)
    torch.manual_seed(0)
    stats = trainer.train(PROMPTS, 1, served=served)[0]
    assert len(steps) == 3 and all(len(s) == 4 and s[0] == s[1] and s[2] == s[3] for s in steps)
    assert sorted(i for s in steps for i in s[::2]) == list(range(6))  # every conversation once
    assert stats["ppo/policy/clipfrac"] == 0.0 and "ppo/loss/kl" not in stats and stats["objective/kl_coef"] == 0.0
    assert stats["ppo/steps"] == 3 and "ppo/stopped_early" not in stats


@pytest.mark.parametrize("max_kl, steps", [(1e-3, 1), (1e6, 3)])
def test_contrast_served_step_stops_once_unseen_answers_measure_max_kl(tiny_base, max_kl, steps):
    """The first minibatch measures ~0 nats from the starting policy and is trained on; after a step at lr 5e-2 the
    next one measures more than 1e-3 nats, so the pass stops there; a budget it never reaches takes all 3 steps."""
    base, tokenizer = tiny_base
    config = tiny_config(minibatch_size=2, lr=5e-2, served_step="contrast", max_kl=max_kl)
    trainer = PPOTrainer(base, tokenizer, None, config)
    served = six_comparisons()
    torch.manual_seed(0)
    stats = trainer.train(PROMPTS, 1, served=served)[0]
    assert stats["ppo/steps"] == steps
    assert (stats.get("ppo/stopped_early") == 1.0) == (steps == 1)
    assert (stats["ppo/step_kl"] > max_kl) == (steps == 1)


def test_own_distance_is_k1_over_the_answers_the_start_sampled_itself():
    """Rows 0 and 1 sampled by the starting policy: (1.0 + 0.5) and (2.0) nats over their unmasked tokens, mean
    1.75; row 2 (another version's answer, 9 nats) never counts, and with no row of its own there is no measure."""
    logprobs = torch.tensor([[-1.0, -1.5, -7.0], [-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-2.0, -2.0, 0.0], [-3.0, -2.0, -3.0], [-4.0, -4.0, -4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]])
    batch = TokenBatch(torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long), mask, 1)
    zeros = torch.zeros(3, 3)
    rollouts = Rollouts([], [], [], batch, torch.ones(3, dtype=torch.bool), logprobs, ref, zeros, zeros)
    assert own_distance(rollouts, [True, True, False]) == pytest.approx(1.75)
    assert own_distance(rollouts, [False, False, False]) is None


@pytest.mark.parametrize("own", [True, False])  # False: answers other versions wrote, so it samples its own
@pytest.mark.parametrize("room, steps", [(0.0, 0), (1e6, 3)])
def test_the_contrast_stop_leaves_room_for_the_starts_own_distance(
    tiny_base, tiny_model_dir, tmp_path, room, steps, own
):
    """From a production adapter away from the reference, kl_limit spends the start's own distance first: a limit
    of exactly that distance leaves no room (no step), one far beyond it leaves max_kl (all 3 steps)."""
    base, tokenizer = tiny_base
    adapter_dir = make_adapter(tiny_model_dir, tmp_path / "prod", seed=3)
    config = tiny_config(minibatch_size=2, lr=5e-2, served_step="contrast", max_kl=1e6)
    probe = PPOTrainer(load_base(tiny_model_dir)[0], tokenizer, None, config, init_adapter_dir=adapter_dir)
    served = [s._replace(on_policy=own) for s in six_comparisons()]
    start_kl = probe.step_served(served, kl_limit=float("inf"))["ppo/start_kl"]
    assert start_kl > 0.1  # the adapter really is away from the reference
    trainer = PPOTrainer(base, tokenizer, None, config, init_adapter_dir=adapter_dir)
    stats = trainer.train(PROMPTS, 1, served=served, kl_limit=start_kl + room)[0]
    assert stats["ppo/start_kl"] == pytest.approx(start_kl)
    assert stats["ppo/kl_room"] == pytest.approx(min(room, 1e6))
    assert stats["ppo/steps"] == steps
    assert (stats.get("ppo/stopped_early") == 1.0) == (steps == 0)


def test_a_fresh_adapters_contrast_has_no_distance_to_spend(tiny_base):
    base, tokenizer = tiny_base
    config = tiny_config(minibatch_size=2, served_step="contrast", max_kl=5.0)
    stats = PPOTrainer(base, tokenizer, None, config).train(PROMPTS, 1, served=six_comparisons(), kl_limit=12.0)[0]
    assert stats["ppo/start_kl"] == 0.0 and stats["ppo/kl_room"] == 5.0  # the first run's stop is max_kl's
