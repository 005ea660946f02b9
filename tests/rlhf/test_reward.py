"""Reward model: losses and the head's fit against hand-computed values, pooling by hand, the feature cache,
calibration, save/load, learning a synthetic preference (answers mentioning " banana") on the tiny random model,
and scoring with a policy's base (its adapters disabled, left as they were)."""

import math
import random
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from common.records import Pair, Thumb
from rlhf.config import RewardConfig
from rlhf.data import build_datasets
from rlhf.features import FeatureCache, answer_key, compute_features, feature_signature, layer_indexes, pool
from rlhf.modeling import load_base
from rlhf.reward import (
    RewardModel,
    accuracy,
    accuracy_interval,
    bradley_terry_loss,
    fit_head,
    fit_linear,
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


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path):
    return load_base(tiny_model_dir)[0]  # frozen and never wrapped: one per module


@pytest.fixture(scope="module")
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


def test_fit_linear_finds_the_feature_that_decides_and_ignores_the_other():
    # Feature 0 decides every pair; feature 1 is noise. The fitted weight follows feature 0.
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(40, 2, generator=generator)
    order = z[:, 0].argsort(descending=True)
    pairs = torch.stack([order[:20], order[20:]], dim=1)  # each top-half row beats a bottom-half one
    w, _ = fit_linear(z, pairs, torch.zeros(0, dtype=torch.long), torch.zeros(0), RewardConfig(l2=1e-3))
    assert w[0] > 1.0 and abs(w[1]) < 0.2 * w[0]
    # Thumbs alone set the bias too: all up gives a positive score at z = 0.
    w, b = fit_linear(z, torch.zeros(0, 2, dtype=torch.long), torch.arange(40), torch.ones(40), RewardConfig())
    assert b > 0


def test_l2_shrinks_the_weights():
    z = torch.tensor([[1.0], [0.0]])
    pairs = torch.tensor([[0, 1]])
    none = torch.zeros(0, dtype=torch.long)
    loose, _ = fit_linear(z, pairs, none, torch.zeros(0), RewardConfig(l2=1e-3))
    tight, _ = fit_linear(z, pairs, none, torch.zeros(0), RewardConfig(l2=1.0))
    # One pair, margin w: minimise log(1 + e^-w) + l2 w^2; at l2 = 1 the optimum solves 1 / (1 + e^w) = 2w.
    assert tight.item() == pytest.approx(0.2223, abs=1e-3)
    assert loose.item() > 3 * tight.item()


def test_the_first_ensemble_member_sees_every_vote_and_the_others_resample():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(30, 3, generator=generator)
    pairs = torch.tensor([[i, i + 15] for i in range(15)])
    none = torch.zeros(0, dtype=torch.long)
    config = RewardConfig(ensemble=3)
    head = fit_head(x, pairs, none, torch.zeros(0), config)
    w, _ = fit_linear((x - x.mean(0)) / x.std(0), pairs, none, torch.zeros(0), config)
    torch.testing.assert_close(head.weight[0], w)
    assert not torch.allclose(head.weight[1], head.weight[0]) and not torch.allclose(head.weight[2], head.weight[1])
    torch.testing.assert_close(head(x), head.members(x).mean(-1))


def test_pooling_by_hand():
    # Two rows, prompt of 1 column, answers of 3 and 1 tokens (right-padded); hidden size 1; two "layers".
    layer = torch.tensor([[[9.0], [1.0], [2.0], [6.0]], [[9.0], [4.0], [7.0], [7.0]]])  # (B, P + R, H)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    hidden = [layer * 10, layer]  # index 0 (the embeddings) and 1 (the last layer of a 1-layer model)
    mean = pool(hidden, mask, 1, RewardConfig(layers=(1.0,), pooling="mean"))
    torch.testing.assert_close(mean, torch.tensor([[3.0], [4.0]]))  # (1 + 2 + 6) / 3; padding ignored
    both = pool(hidden, mask, 1, RewardConfig(layers=(0.0, 1.0), pooling="mean+last"))
    torch.testing.assert_close(both, torch.tensor([[30.0, 60.0, 3.0, 6.0], [40.0, 40.0, 4.0, 4.0]]))
    assert layer_indexes((0.5, 0.8), 30) == [15, 24] and layer_indexes((0.0, 1.0), 2) == [0, 2]
    with pytest.raises(ValueError):
        layer_indexes((2.0,), 30)


def test_features_ignore_padding(base, tokenizer):
    """A row gets the same features alone as beside longer prompts and answers (left- and right-padded)."""
    short = [{"role": "user", "content": "Hi?"}]
    long = [{"role": "user", "content": "A much longer question about rivers, bridges and clocks?"}]
    alone = compute_features(base, tokenizer, [short], ["yes"], FAST)
    padded = compute_features(base, tokenizer, [short, long], ["yes", "a far longer answer than the first"], FAST)
    torch.testing.assert_close(padded[:1], alone, atol=1e-5, rtol=0)


def test_the_cache_computes_each_answer_once_and_keeps_only_what_is_asked(base, tokenizer, tmp_path):
    prompt = [{"role": "user", "content": "Hi?"}]
    signature = feature_signature(FAST, "tiny")
    cache = FeatureCache(tmp_path, signature)
    first = cache.features(base, tokenizer, [prompt, prompt], ["a", "b"], FAST)
    assert cache.computed == 2
    again = cache.features(base, tokenizer, [prompt, prompt, prompt], ["b", "a", "b"], FAST)
    assert cache.computed == 2  # all three from the cache
    torch.testing.assert_close(again, first[[1, 0, 1]])
    cache.keep({answer_key(prompt, "a")})
    reopened = FeatureCache(tmp_path, signature)
    assert set(reopened.vectors) == {answer_key(prompt, "a")}
    torch.testing.assert_close(reopened.vectors[answer_key(prompt, "a")], first[0])
    assert FeatureCache(tmp_path, feature_signature(RewardConfig(), "tiny")).vectors == {}  # other layers: new file


def test_calibrate_gives_mean_zero_std_one(tiny_model_dir, tmp_path):
    model = RewardModel.load(make_reward_model(tiny_model_dir, tmp_path / "rm"))
    features = torch.randn(12, 128)
    model.calibrate(model.raw(features))
    scores = model.normalised(features)
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert scores.std().item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError):
        model.calibrate(torch.tensor([0.5, 0.5]))


def test_save_load_round_trip(tiny_model_dir, tmp_path):
    model = RewardModel.load(make_reward_model(tiny_model_dir, tmp_path / "rm", metadata={"run": "r1"}))
    again = RewardModel.load(tmp_path / "rm")
    features = torch.randn(5, 128)
    torch.testing.assert_close(again.normalised(features), model.normalised(features))
    assert again.config == FAST
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "rm")  # a version is never overwritten


def test_accuracy_and_its_interval():
    assert accuracy(torch.tensor([1.0, -1.0, 0.0, 2.0])) == 0.625  # ties count half
    assert accuracy_interval(torch.ones(50), bootstrap=200) == (1.0, 1.0)
    low, high = accuracy_interval(torch.tensor([1.0, -1.0] * 100), bootstrap=500)
    assert 0.42 < low < 0.5 < high < 0.58  # 200 coin flips: +-0.07


def test_learns_synthetic_preference(base, tokenizer, tmp_path):
    data = build_datasets([*banana_pairs(160), *banana_thumbs(40)], heldout_fraction=0.25)
    _, metrics = train_reward_model(base, tokenizer, data, FAST, cache_dir=tmp_path)
    assert metrics["reward/heldout_pairs"] >= 25
    assert metrics["reward/heldout_accuracy"] >= 0.85
    assert metrics["reward/heldout_accuracy_low"] <= metrics["reward/heldout_accuracy"]
    assert metrics["reward/heldout_accuracy"] <= metrics["reward/heldout_accuracy_high"]
    assert metrics["reward/baseline_longer_wins_accuracy"] == pytest.approx(0.5, abs=0.15)  # same lengths
    # The second run on the same data finds every feature in the cache.
    _, again = train_reward_model(base, tokenizer, data, FAST, cache_dir=tmp_path)
    assert again["reward/cached_answers"] == again["reward/answers"]
    assert again["reward/heldout_accuracy"] == metrics["reward/heldout_accuracy"]


def test_thumbs_alone_train_the_right_sign(base, tokenizer):
    data = build_datasets(banana_thumbs(120), heldout_fraction=0.0)
    model, _ = train_reward_model(base, tokenizer, data, FAST)
    pairs = banana_pairs(40, seed=5)
    prompts = [p.prompt for p in pairs]
    margins = model.raw(compute_features(base, tokenizer, prompts, [p.chosen for p in pairs], FAST))
    margins -= model.raw(compute_features(base, tokenizer, prompts, [p.rejected for p in pairs], FAST))
    assert accuracy(margins) >= 0.75


def test_scoring_with_a_policy_reads_its_base_and_leaves_it_as_it_was(tiny_model_dir, tokenizer, tmp_path):
    model = RewardModel.load(make_reward_model(tiny_model_dir, tmp_path / "rm"))
    policy = PeftModel.from_pretrained(
        load_base(tiny_model_dir)[0], make_adapter(tiny_model_dir, tmp_path / "a", seed=3), is_trainable=True
    )
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    prompts, answers = [[{"role": "user", "content": "Hi?"}]] * 2, ["yes", "no thanks"]
    eos = tokenizer.eos_token_id
    scores = model.reward_fn(policy, tokenizer)(prompts, answers, [[eos], [5]])  # the first stopped, the second not
    plain = compute_features(load_base(tiny_model_dir)[0], tokenizer, prompts, answers, FAST, ended=[True, False])
    torch.testing.assert_close(scores, model.normalised(plain), atol=1e-5, rtol=0)
    cut = compute_features(load_base(tiny_model_dir)[0], tokenizer, prompts[1:], answers[1:], FAST, ended=[True])
    assert not torch.allclose(plain[1:], cut)  # a cut-off answer and the same text finished read differently
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable
    assert policy.active_adapter == "default"
