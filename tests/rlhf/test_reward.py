"""Reward model: losses against hand-computed values, calibration, save/load, learning a synthetic
preference (answers mentioning " banana") on the tiny random model, and living as an adapter of the
policy's PeftModel (one copy of the base)."""

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from common.records import Pair, Thumb
from rlhf.config import LoraSettings
from rlhf.data import build_datasets
from rlhf.modeling import build_batch, encode_answer, encode_prompt, forward, load_base
from rlhf.reward import (
    ADAPTER,
    META_FILE,
    WEIGHTS_FILE,
    RewardModel,
    bradley_terry_loss,
    pointwise_loss,
    train_reward_model,
)
from tests.models import make_adapter
from tests.rlhf.helpers import FAST, make_reward_model

FILLER = [
    "apple", "river", "stone", "cloud", "green", "quiet", "table", "window", "garden", "yellow", "paper", "music",
    "winter", "bright", "simple", "silver", "mountain", "forest", "candle", "morning", "coffee", "friendly", "ocean",
    "purple", "market", "pencil", "travel", "summer", "little", "rabbit", "orange", "planet", "soft", "gentle",
    "thunder", "kitchen", "carpet", "lamp", "bottle",
]
TOPICS = ["rivers", "clocks", "bridges", "gardens", "trains", "maps", "songs", "tools", "birds", "rooms"]
def prompt(rng: random.Random, i: int) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"About {rng.choice(TOPICS)} {i}?"}]


def filler(rng: random.Random) -> list[str]:
    return rng.sample(FILLER, rng.randint(2, 5))


def banana_pairs(n: int, seed: int = 0) -> list[Pair]:
    """Chosen = random filler with " banana" inserted; rejected = the same with another word there (same length)."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        words, at = filler(rng), rng.randint(0, 2)
        chosen = " ".join([*words[:at], "banana", *words[at:]])
        rejected = " ".join([*words[:at], rng.choice(FILLER), *words[at:]])
        pairs.append(Pair(prompt(rng, i), chosen, rejected))
    return pairs


def banana_thumbs(n: int, seed: int = 1) -> list[Thumb]:
    rng = random.Random(seed)
    thumbs = []
    for i in range(n):
        words, up = filler(rng), i % 2 == 0
        if up:
            words.insert(rng.randint(0, len(words)), "banana")
        thumbs.append(Thumb(prompt(rng, i), " ".join(words), up))
    return thumbs


def policy_model(model_dir: Path, adapter_dir: Path) -> PeftModel:
    """A trainable policy adapter on a fresh base, as PPOTrainer makes it."""
    return PeftModel.from_pretrained(load_base(model_dir)[0], adapter_dir, is_trainable=True).eval()


@pytest.fixture
def base(tiny_model_dir: Path):
    """A fresh base per test: the reward model injects its LoRA into the base in place."""
    return load_base(tiny_model_dir)[0]


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    return load_base(tiny_model_dir)[1]


def test_bradley_terry_loss_by_hand():
    assert bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0])).item() == pytest.approx(0.126928, abs=1e-6)
    # Equal scores: log 2. Mean over pairs: (log(1 + e^-2) + log(1 + e^2)) / 2.
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0])).item() == pytest.approx(math.log(2))
    both = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])).item()
    assert both == pytest.approx((math.log1p(math.exp(-2)) + math.log1p(math.exp(2))) / 2)
    # Stable for huge margins: finite on the wrong side, not log(0) = -inf.
    assert bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([0.0])).item() == pytest.approx(200.0)
    assert bradley_terry_loss(torch.tensor([200.0]), torch.tensor([0.0])).item() == pytest.approx(0.0, abs=1e-30)


def test_pointwise_loss_by_hand():
    assert pointwise_loss(torch.tensor([0.0]), torch.tensor([True])).item() == pytest.approx(math.log(2))
    assert pointwise_loss(torch.tensor([2.0]), torch.tensor([1.0])).item() == pytest.approx(0.126928, abs=1e-6)
    assert pointwise_loss(torch.tensor([2.0]), torch.tensor([0.0])).item() == pytest.approx(2.126928, abs=1e-6)
    mixed = pointwise_loss(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 0.0])).item()
    assert mixed == pytest.approx((0.126928 + 2.126928) / 2, abs=1e-6)


def test_calibrate_gives_mean_zero_std_one(base, tokenizer):
    model = RewardModel(base, FAST)
    pairs = banana_pairs(12)
    prompts, answers = [p.prompt for p in pairs], [p.chosen for p in pairs]
    raw = model.raw_scores(tokenizer, prompts, answers)
    assert raw.shape == (12,) and raw.std() > 0
    model.calibrate(raw)
    scores = model.score_texts(tokenizer, prompts, answers)
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert scores.std().item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError):
        model.calibrate(torch.tensor([0.5, 0.5]))


def test_score_ignores_padding(base, tokenizer):
    """A row scores the same alone as beside longer prompts and answers (left- and right-padded)."""
    model = RewardModel(base, FAST)
    short = [{"role": "user", "content": "Hi?"}]
    long = [{"role": "user", "content": "A much longer question about rivers, bridges and clocks?"}]
    alone = model.raw_scores(tokenizer, [short], ["yes"])
    padded = model.raw_scores(tokenizer, [short, long], ["yes", "a far longer answer than the first one"])
    torch.testing.assert_close(padded[:1], alone, atol=1e-5, rtol=0)


def test_save_load_round_trip(base, tokenizer, tiny_model_dir, tmp_path):
    data = build_datasets([*banana_pairs(24), *banana_thumbs(8)], heldout_fraction=0.0)
    config = replace(FAST, epochs=1)
    model, metrics = train_reward_model(base, tokenizer, data, config)
    pairs = banana_pairs(6, seed=5)
    prompts, answers = [p.prompt for p in pairs], [p.rejected for p in pairs]
    before = model.score_texts(tokenizer, prompts, answers)

    out = model.save(tmp_path / "rm-v1", {"metrics": metrics})
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS_FILE, META_FILE])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    tensors = load_file(out / WEIGHTS_FILE)  # safetensors, not pickle
    assert "head.weight" in tensors and any("lora_A" in k for k in tensors)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["base_model"] == str(tiny_model_dir)
    assert meta["config"]["lora"]["r"] == 8 and meta["calibration"] == model.calibration
    assert meta["metadata"]["metrics"]["reward/train_pairs"] == 24 and meta["created_at"]
    with pytest.raises(FileExistsError):
        model.save(out)

    loaded = RewardModel.load(out, load_base(tiny_model_dir)[0])
    assert torch.equal(loaded.score_texts(tokenizer, prompts, answers), before)
    assert loaded.config == config


def test_training_is_deterministic(tiny_model_dir):
    data = build_datasets(banana_pairs(16), heldout_fraction=0.0)
    config = replace(FAST, epochs=1, batch_size=8)
    calls = []
    runs = []
    for _ in range(2):
        base, tokenizer = load_base(tiny_model_dir)
        model, _ = train_reward_model(base, tokenizer, data, config, progress=lambda *a: calls.append(a[:2]))
        runs.append(model.raw_scores(tokenizer, [p.prompt for p in data.pairs], [p.chosen for p in data.pairs]))
    assert torch.equal(runs[0], runs[1])
    assert calls == [(1, 2), (2, 2)] * 2


def test_learns_synthetic_preference(base, tokenizer):
    data = build_datasets(banana_pairs(300), heldout_fraction=0.2)
    assert len(data.heldout_pairs) >= 40
    _, metrics = train_reward_model(base, tokenizer, data, FAST)
    assert metrics["reward/heldout_accuracy"] >= 0.9
    assert metrics["reward/heldout_pairs"] == len(data.heldout_pairs)
    # Chosen and rejected have the same number of words: length alone cannot explain the accuracy.
    assert metrics["reward/baseline_longer_wins_accuracy"] < 0.7
    assert metrics["reward/heldout_loss"] < metrics["reward/train_loss"] + 0.3


def test_thumbs_alone_train_the_right_sign(base, tokenizer):
    data = build_datasets(banana_thumbs(300), heldout_fraction=0.2)
    assert not data.pairs and data.heldout_thumbs
    model, metrics = train_reward_model(base, tokenizer, data, FAST)
    assert metrics["reward/heldout_thumbs_accuracy"] >= 0.8
    assert "reward/heldout_accuracy" not in metrics
    up = [t for t in data.heldout_thumbs if t.label]
    down = [t for t in data.heldout_thumbs if not t.label]
    raw_up = model.raw_scores(tokenizer, [t.prompt for t in up], [t.answer for t in up])
    raw_down = model.raw_scores(tokenizer, [t.prompt for t in down], [t.answer for t in down])
    assert raw_up.mean() > 0 > raw_down.mean()


def test_warm_start_keeps_what_earlier_feedback_taught(tiny_model_dir, tokenizer, tmp_path):
    """A run continuing from the previous reward model starts where it ended; one trained afresh on a
    handful of new votes has not seen enough to know the preference."""
    heldout = banana_pairs(60, seed=9)
    first, _ = train_reward_model(load_base(tiny_model_dir)[0], tokenizer, build_datasets(banana_pairs(300)), FAST)
    saved = first.save(tmp_path / "rm-1")

    def accuracy(model: RewardModel) -> float:
        prompts = [p.prompt for p in heldout]
        chosen = model.raw_scores(tokenizer, prompts, [p.chosen for p in heldout])
        rejected = model.raw_scores(tokenizer, prompts, [p.rejected for p in heldout])
        return (chosen > rejected).float().mean().item()

    few = build_datasets(banana_pairs(4, seed=3), heldout_fraction=0.0)
    one_step = replace(FAST, epochs=1, lr=1e-4)
    warm, metrics = train_reward_model(load_base(tiny_model_dir)[0], tokenizer, few, one_step, init=saved)
    fresh, fresh_metrics = train_reward_model(load_base(tiny_model_dir)[0], tokenizer, few, one_step)
    assert metrics["reward/warm_start"] == 1.0 and fresh_metrics["reward/warm_start"] == 0.0
    assert accuracy(first) >= 0.9 and accuracy(warm) >= 0.9
    assert accuracy(fresh) < 0.75

    other_rank = replace(FAST, lora=LoraSettings(r=4, alpha=8))
    with pytest.raises(ValueError, match="do not fit"):
        train_reward_model(load_base(tiny_model_dir)[0], tokenizer, few, other_rank, init=saved)


@pytest.fixture(scope="module")
def saved_reward_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_reward_model(tiny_model_dir, tmp_path_factory.mktemp("rm") / "v1")


@pytest.fixture(scope="module")
def policy_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("policy") / "v1", seed=3)


def test_shared_adapter_scores_equal_standalone(
    tiny_model_dir, tokenizer, saved_reward_model, policy_adapter, tmp_path
):
    pairs = banana_pairs(10, seed=3)
    prompts, answers = [p.prompt for p in pairs], [p.chosen for p in pairs]
    alone = RewardModel.load(saved_reward_model, load_base(tiny_model_dir)[0])
    policy = policy_model(tiny_model_dir, policy_adapter)
    shared = RewardModel.load(saved_reward_model, policy)
    assert shared.shared and not alone.shared and shared.body is policy
    assert set(policy.peft_config) == {"default", ADAPTER}
    expected = alone.score_texts(tokenizer, prompts, answers)
    assert torch.equal(shared.score_texts(tokenizer, prompts, answers), expected)
    with alone.body.disable_adapter():  # not vacuous: the reward model's adapter matters
        assert not torch.allclose(alone.score_texts(tokenizer, prompts, answers), expected, atol=1e-3)

    # Saved from the shared model, the artefact is the standalone format, tensor for tensor.
    out = shared.save(tmp_path / "again")
    again, original = load_file(out / WEIGHTS_FILE), load_file(saved_reward_model / WEIGHTS_FILE)
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in original)


def test_scoring_leaves_the_policy_as_it_was(tiny_model_dir, tokenizer, saved_reward_model, policy_adapter):
    policy = policy_model(tiny_model_dir, policy_adapter)
    pairs = banana_pairs(4, seed=4)
    prompt_ids = [encode_prompt(tokenizer, p.prompt) for p in pairs]
    batch = build_batch(prompt_ids, [encode_answer(tokenizer, p.chosen) for p in pairs], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = forward(policy, batch).logits
    flags = {name: p.requires_grad for name, p in policy.named_parameters()}

    reward_model = RewardModel.load(saved_reward_model, policy)
    reward_flags = {name: p.requires_grad for name, p in policy.named_parameters() if f".{ADAPTER}." in name}
    assert reward_flags and not any(reward_flags.values())  # joins frozen
    reward_model.raw_scores(tokenizer, [p.prompt for p in pairs], [p.rejected for p in pairs])

    assert policy.active_adapter == "default"
    after = {name: p.requires_grad for name, p in policy.named_parameters()}
    assert after == flags | reward_flags  # the policy's LoRA still trainable, the rest (reward included) frozen
    assert any(flags.values())
    with torch.no_grad():
        assert torch.equal(forward(policy, batch).logits, logits)
    with policy.disable_adapter(), pytest.raises(RuntimeError, match="disable_adapter"):
        reward_model.raw_scores(tokenizer, [pairs[0].prompt], [pairs[0].chosen])
