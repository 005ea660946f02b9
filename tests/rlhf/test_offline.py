"""DPO and KTO through TRL on the tiny random Llama: they learn a marker word, the reference is the bare base,
the round continues from the init adapter, and only the adapter is saved."""

from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from common.models import ADAPTER_FILES
from common.records import Pair, Thumb
from rlhf.config import LoraSettings, OfflineConfig
from rlhf.data import FeedbackData
from rlhf.modeling import (
    build_batch,
    encode_answer,
    encode_prompt,
    forward,
    load_base,
    peft_config,
    token_logprobs,
)
from rlhf.offline import kto_rows, kto_weights, thumb_pairs, train_offline, warmup_steps
from tests.models import make_adapter

TOPICS = (
    "cats", "dogs", "rain", "the sea", "music", "bread", "trains", "stars", "tea", "snow", "chess", "bees",
    "apples", "clouds", "rivers", "books", "maps", "owls", "kites", "ships",
)


def prompt(topic: str) -> list[dict]:
    """Short, with a system message replacing SmolLM2's long default one: on CPU TRL runs every position,
    prompt included, through the LM head, and with the tiny model's 49k vocabulary that is most of the time."""
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{topic}?"}]


# Every chosen answer has the marker word "love", no rejected one does.
PAIRS = [Pair(prompt(topic), f"I love {topic}.", f"I hate {topic}.") for topic in TOPICS]


def tiny_config(**overrides) -> OfflineConfig:
    settings = dict(
        lr=5e-3, epochs=3, batch_size=4, warmup=0.0, max_prompt_tokens=64, max_answer_tokens=16,
        lora=LoraSettings(r=8, alpha=16),
    )
    return OfflineConfig(**settings | overrides)


@pytest.fixture
def tiny_base(tiny_model_dir: Path):
    """A fresh tiny base and its tokenizer per test (training wraps the base in place)."""
    return load_base(tiny_model_dir)


@torch.no_grad()
def implicit_rewards(model: PeftModel, tokenizer, items: list[tuple[list[dict], str]]) -> torch.Tensor:
    """log pi(answer) - log ref(answer) summed over answer tokens, ref = the adapter disabled. (B,)"""
    batch = build_batch(
        [encode_prompt(tokenizer, prompt) for prompt, _ in items],
        [encode_answer(tokenizer, answer) for _, answer in items], tokenizer.pad_token_id,
    )
    p, r = batch.prompt_len, batch.response_mask.shape[1]

    def logprobs() -> torch.Tensor:
        logits = forward(model, batch).logits[:, p - 1 : p - 1 + r].float()  # (B, R, V)
        return (token_logprobs(logits, batch.responses) * batch.response_mask).sum(-1)

    policy = logprobs()
    with model.disable_adapter():
        return policy - logprobs()


def load_policy(model_dir: Path, adapter_dir: Path) -> tuple[PeftModel, object]:
    base, tokenizer = load_base(model_dir)
    return PeftModel.from_pretrained(base, adapter_dir), tokenizer


def pair_margin(model: PeftModel, tokenizer, pairs: list[Pair]) -> float:
    chosen = implicit_rewards(model, tokenizer, [(pair.prompt, pair.chosen) for pair in pairs])
    rejected = implicit_rewards(model, tokenizer, [(pair.prompt, pair.rejected) for pair in pairs])
    return (chosen - rejected).mean().item()


def step_logs(history: list[dict]) -> list[dict]:
    return [log for log in history if "loss" in log]


def test_thumbs_form_pairs_per_prompt():
    a, b = prompt("cats"), prompt("dogs")
    thumbs = [
        Thumb(a, "up one", True), Thumb(a, "down", False), Thumb(a, "up two", True),
        Thumb(b, "only up", True), Thumb(b, "also up", True),
    ]
    pairs = thumb_pairs(thumbs)
    assert sorted((p.chosen, p.rejected) for p in pairs) == [("up one", "down"), ("up two", "down")]
    assert all(p.prompt == a for p in pairs)
    assert thumb_pairs([Thumb(a, "same", True), Thumb(a, "same", False)]) == []


def test_kto_rows_split_pairs_into_labels():
    data = FeedbackData(pairs=PAIRS[:2], thumbs=[Thumb(prompt("tea"), "Tea is fine.", False)])
    rows = kto_rows(data, seed=0)
    labelled = sorted((row["prompt"][-1]["content"], row["completion"][0]["content"], row["label"]) for row in rows)
    assert labelled == [
        ("cats?", "I hate cats.", False), ("cats?", "I love cats.", True),
        ("dogs?", "I hate dogs.", False), ("dogs?", "I love dogs.", True), ("tea?", "Tea is fine.", False),
    ]
    assert all(row["completion"][0]["role"] == "assistant" for row in rows)


def test_kto_weights_balance_the_classes():
    assert kto_weights([True] * 3 + [False] * 9) == (3.0, 1.0)
    assert kto_weights([True] * 8 + [False] * 2) == (1.0, 4.0)
    assert kto_weights([True, False]) == (1.0, 1.0)


@pytest.mark.parametrize("algorithm", ["dpo", "kto"])
def test_empty_data_is_an_error(tiny_base, tmp_path, algorithm):
    base, tokenizer = tiny_base
    with pytest.raises(ValueError, match=algorithm.upper()):
        train_offline(base, tokenizer, FeedbackData(), tiny_config(algorithm=algorithm), None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_thumbs_without_a_down_vote_give_dpo_nothing(tiny_base, tmp_path):
    base, tokenizer = tiny_base
    data = FeedbackData(thumbs=[Thumb(prompt("cats"), "I love cats.", True)])
    with pytest.raises(ValueError, match="pairs"):
        train_offline(base, tokenizer, data, tiny_config(), None, tmp_path / "out")


def test_unknown_algorithm_is_an_error():
    with pytest.raises(ValueError, match="ppo"):
        OfflineConfig(algorithm="ppo")


def test_dpo_learns_the_marker_and_saves_only_the_adapter(tiny_base, tiny_model_dir, tmp_path):
    base, tokenizer = tiny_base
    q_proj = base.model.layers[0].self_attn.q_proj.weight.clone()
    embed = base.get_input_embeddings().weight.clone()
    calls = []
    out = tmp_path / "candidate"
    config = tiny_config()
    history = train_offline(
        base, tokenizer, FeedbackData(pairs=PAIRS), config, None, out,
        progress=lambda step, total, logs: calls.append((step, total, logs)),
    )

    steps = step_logs(history)
    steps_per_epoch = len(PAIRS) // config.batch_size
    assert len(steps) == config.epochs * steps_per_epoch
    assert {"rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"} <= steps[-1].keys()
    last_epoch = steps[-steps_per_epoch:]
    assert sum(log["rewards/accuracies"] for log in last_epoch) / len(last_epoch) >= 0.9
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert calls[-1][0] == calls[-1][1] == len(steps)

    # The base stayed frozen; the adapter went around it.
    assert torch.equal(base.model.layers[0].self_attn.q_proj.base_layer.weight, q_proj)
    assert torch.equal(base.get_input_embeddings().weight, embed)

    # Only the adapter, in place, nothing half-written beside it.
    assert sorted(p.name for p in out.iterdir()) == sorted(ADAPTER_FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["candidate"]
    assert all("lora_" in key for key in load_file(out / "adapter_model.safetensors"))

    # The margin over the reference, 0 for the fresh adapter (B = 0), is clearly positive on a fresh load.
    fresh, _ = load_base(tiny_model_dir)
    assert pair_margin(get_peft_model(fresh, peft_config(config.lora)), tokenizer, PAIRS) == 0.0
    policy, tokenizer = load_policy(tiny_model_dir, out)
    assert pair_margin(policy, tokenizer, PAIRS) > 1.0


def test_warmup_rounds_down_so_a_short_run_still_learns(tiny_base, tiny_model_dir, tmp_path):
    config = OfflineConfig(batch_size=8, grad_accum=1, epochs=1, warmup=0.1)
    assert warmup_steps(config, 8) == 0  # one step: warming up would spend it at lr 0
    assert warmup_steps(config, 100) == 1  # 13 steps
    assert warmup_steps(OfflineConfig(batch_size=8, epochs=2, warmup=0.1), 400) == 10  # 100 steps

    base, tokenizer = tiny_base  # a run of a single step (all the pairs in one batch), warmup as the service's
    train_offline(base, tokenizer, FeedbackData(pairs=PAIRS[:4]), tiny_config(epochs=1, warmup=0.1), None,
                  tmp_path / "candidate")
    policy, tokenizer = load_policy(tiny_model_dir, tmp_path / "candidate")
    assert pair_margin(policy, tokenizer, PAIRS[:4]) > 0.0  # the adapter moved (a fresh one's margin is exactly 0)


def test_dpo_continues_from_the_init_adapter_against_the_bare_base(tiny_base, tiny_model_dir, tmp_path):
    """With lr 0 the saved adapter is the init adapter, and TRL's rewards are not 0: the reference is the
    base with the adapter disabled, not a copy of the init adapter (TRL's default for a PeftModel)."""
    base, tokenizer = tiny_base
    init = make_adapter(tiny_model_dir, tmp_path / "init", seed=3)
    out = tmp_path / "candidate"
    history = train_offline(
        base, tokenizer, FeedbackData(pairs=PAIRS[:8]), tiny_config(lr=0.0, epochs=1), init, out
    )

    saved, initial = load_file(out / "adapter_model.safetensors"), load_file(init / "adapter_model.safetensors")
    assert saved.keys() == initial.keys()
    assert all(torch.equal(saved[key], initial[key]) for key in saved)
    first = step_logs(history)[0]
    assert abs(first["rewards/chosen"]) > 1e-3 and abs(first["rewards/rejected"]) > 1e-3

    policy, tokenizer = load_policy(tiny_model_dir, out)
    rewards = implicit_rewards(policy, tokenizer, [(pair.prompt, pair.chosen) for pair in PAIRS[:4]])
    assert rewards.abs().min() > 1e-3  # the init adapter moves the policy away from the base


def test_kto_raises_desirable_over_undesirable(tiny_base, tiny_model_dir, tmp_path):
    base, tokenizer = tiny_base
    ups = [Thumb(prompt(topic), f"I love {topic}.", True) for topic in TOPICS[:12]]
    downs = [Thumb(prompt(topic), f"I hate {topic}.", False) for topic in TOPICS[12:16]]
    data = FeedbackData(pairs=PAIRS[16:], thumbs=ups + downs)  # 16 desirable, 8 undesirable
    out = tmp_path / "candidate"
    history = train_offline(base, tokenizer, data, tiny_config(algorithm="kto"), None, out)

    logged = set().union(*step_logs(history))  # a batch logs rewards/chosen only if it holds a desirable answer
    assert {"rewards/chosen", "rewards/rejected", "kl"} <= logged
    policy, tokenizer = load_policy(tiny_model_dir, out)
    good = [(t.prompt, t.answer) for t in ups] + [(pair.prompt, pair.chosen) for pair in PAIRS[16:]]
    bad = [(t.prompt, t.answer) for t in downs] + [(pair.prompt, pair.rejected) for pair in PAIRS[16:]]
    gap = implicit_rewards(policy, tokenizer, good).mean() - implicit_rewards(policy, tokenizer, bad).mean()
    assert gap > 1.0  # 0 before training: the fresh adapter is the reference
