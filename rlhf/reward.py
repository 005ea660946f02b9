"""Reward model: a scalar score for (prompt, answer), learned from comparisons and thumbs.

The base LM gets its own LoRA and a linear head read at the last real token of prompt + answer.
Pairs train it with the Bradley-Terry loss; unpaired thumbs with a pointwise logistic loss on the
same scalar, so they count too. PPO consumes normalised scores, gain * raw + bias, with gain and
bias set so the current policy's answers score mean 0, std 1 (lm-human-preferences; RLHF_NOTES).
"""

import contextlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.conversations import Messages, conversation_id
from common.records import Pair, Thumb
from rlhf.config import RewardConfig
from rlhf.data import FeedbackData
from rlhf.modeling import (
    TokenBatch,
    build_batch,
    encode_answer,
    encode_prompt,
    forward,
    last_token_index,
    peft_config,
)
from rlhf.ppo import RewardFn

FORMAT = "chatloop-reward-model/1"
WEIGHTS_FILE = "reward_model.safetensors"
META_FILE = "reward_model.json"
HEAD_PREFIX = "head."
ADAPTER = "reward"  # the reward model's adapter name, alone on its base or beside the policy's

Progress = Callable[[int, int, dict], None]
Tokenizer = PreTrainedTokenizerBase


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """mean(-log sigmoid(r_chosen - r_rejected)); logsigmoid stays finite for large margins."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pointwise_loss(r: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logistic loss of thumbs (1 up, 0 down) with the raw score as the logit of "up"."""
    return F.binary_cross_entropy_with_logits(r, labels.to(r.dtype))


class RewardModel(torch.nn.Module):
    """Base LM + a LoRA adapter of its own + a scalar head.

    Given a plain base, it wraps the base in place (peft injects LoRA layers) with its adapter as the
    only one: the form to train it in (give it a base of its own, rlhf.modeling.load_base). Given a
    PeftModel, the policy's, it joins it as one more adapter, frozen, and switches to it only while
    scoring: policy, reference (all adapters disabled) and reward model then share one copy of the base.
    """

    def __init__(self, model: PreTrainedModel | PeftModel, config: RewardConfig, adapter_name: str = ADAPTER):
        super().__init__()
        self.config, self.adapter_name = config, adapter_name
        self.shared = isinstance(model, PeftModel)
        self.base_name = str(model.name_or_path)
        hidden = model.config.hidden_size
        # peft initialises lora_A from the global RNG: seed it here without disturbing the caller's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            if self.shared:
                model.add_adapter(adapter_name, peft_config(config.lora))
                model.set_requires_grad(adapter_name, requires_grad=False)  # PPO must never train it
                self.body = model
            else:
                self.body = get_peft_model(model, peft_config(config.lora), adapter_name=adapter_name)
            self.head = torch.nn.Linear(hidden, 1)
            # lm-human-preferences' init: unit-scale scores at the start, no offset.
            torch.nn.init.normal_(self.head.weight, std=(hidden + 1) ** -0.5)
            torch.nn.init.zeros_(self.head.bias)
        self.head.to(model.device)
        if self.shared:
            self.head.requires_grad_(False)
        self.gain, self.bias = 1.0, 0.0

    @contextlib.contextmanager
    def _own_adapter(self):
        """On a shared PeftModel: this adapter active inside, the model's active adapter and every
        requires_grad flag as they were afterwards (peft's set_adapter makes what it activates trainable)."""
        if not self.shared:
            yield
            return
        if not self.body.has_active_enabled_adapter:
            raise RuntimeError("the reward model cannot score inside disable_adapter(): its own adapter is off too")
        previous = self.body.active_adapter
        trainable = [p for p in self.body.parameters() if p.requires_grad]
        self.body.set_adapter(self.adapter_name, inference_mode=True)
        try:
            yield
        finally:
            self.body.set_adapter(previous, inference_mode=True)
            for p in trainable:
                p.requires_grad_(True)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        """Raw scores. (B,)"""
        with self._own_adapter():
            # logits unused: keep one column
            out = forward(self.body, batch, hidden=True, logits_to_keep=1, precision=self.config.precision)
        hidden = out.hidden_states[-1]  # (B, T, H), after the final norm
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(batch)]  # (B, H)
        return self.head(last.float()).squeeze(-1)  # (B,)

    @torch.no_grad()
    def score(self, batch: TokenBatch) -> torch.Tensor:
        """Normalised scores for PPO. (B,)"""
        return self.gain * self(batch) + self.bias

    def calibrate(self, raw: torch.Tensor) -> None:
        """Set gain and bias so these raw scores (answers of the current policy) get mean 0, std 1."""
        raw = raw.detach().double()
        if raw.numel() < 2 or not torch.isfinite(raw).all() or raw.std() == 0:
            raise ValueError("calibration needs at least two finite, distinct scores")
        self.gain = 1.0 / raw.std().item()
        self.bias = -self.gain * raw.mean().item()

    def encode(
        self, tokenizer: Tokenizer, prompts: list[Messages], answers: list[str]
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids of each row's prompt and answer, truncated per config; a repeated prompt is templated once."""
        cache: dict[str, list[int]] = {}
        prompt_ids = []
        for prompt in prompts:
            key = conversation_id(prompt)
            if key not in cache:
                cache[key] = encode_prompt(tokenizer, prompt)[-self.config.max_prompt_tokens :]
            prompt_ids.append(cache[key])
        answer_ids = [encode_answer(tokenizer, a, self.config.max_answer_tokens) for a in answers]
        return prompt_ids, answer_ids

    @torch.no_grad()
    def raw_scores_ids(self, prompt_ids: list[list[int]], answer_ids: list[list[int]], pad_id: int) -> torch.Tensor:
        """Raw scores of token-id rows, in batches of config.score_batch_size. (N,)"""
        size = self.config.score_batch_size
        chunks = [
            self(build_batch(prompt_ids[i : i + size], answer_ids[i : i + size], pad_id).to(self.device)).cpu()
            for i in range(0, len(prompt_ids), size)
        ]
        return torch.cat(chunks) if chunks else torch.zeros(0)

    def raw_scores(self, tokenizer: Tokenizer, prompts: list[Messages], answers: list[str]) -> torch.Tensor:
        """Raw scores of answers to chat prompts. (N,) on the CPU"""
        return self.raw_scores_ids(*self.encode(tokenizer, prompts, answers), tokenizer.pad_token_id)

    def score_texts(self, tokenizer: Tokenizer, prompts: list[Messages], answers: list[str]) -> torch.Tensor:
        """Normalised scores of answers to chat prompts, for PPO. (N,) on the CPU"""
        return self.gain * self.raw_scores(tokenizer, prompts, answers) + self.bias

    @property
    def calibration(self) -> dict:
        return {"gain": self.gain, "bias": self.bias}

    def save(self, directory: Path, metadata: dict | None = None) -> Path:
        """Write weights (safetensors) and a JSON description under a temp name, then rename:
        a reader sees the whole directory or none of it. Versions are never overwritten."""
        directory = Path(directory)
        if directory.exists():
            raise FileExistsError(f"{directory} already exists; a reward model version is never overwritten")
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            lora = get_peft_model_state_dict(self.body, adapter_name=self.adapter_name)  # keys without the name
            tensors = {k: v.detach().cpu().contiguous() for k, v in lora.items()}
            tensors |= {HEAD_PREFIX + k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
            save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
            meta = {
                "format": FORMAT, "created_at": datetime.now(UTC).isoformat(), "base_model": self.base_name,
                "config": asdict(self.config), "calibration": self.calibration, "metadata": metadata or {},
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
            os.rename(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(
        cls, directory: Path, model: PreTrainedModel | PeftModel, adapter_name: str = ADAPTER
    ) -> "RewardModel":
        """A saved reward model on a plain base (taken over) or joining a PeftModel as adapter_name (see the class)."""
        reward_model = cls(model, RewardConfig.from_dict(read_meta(directory)["config"]), adapter_name)
        reward_model.load_weights(directory)
        return reward_model

    def load_weights(self, directory: Path) -> None:
        """LoRA, head and calibration from a saved reward model of the same LoRA shape (ValueError otherwise)."""
        directory = Path(directory)
        meta = read_meta(directory)
        tensors = load_file(directory / WEIGHTS_FILE, device=str(self.device))
        head = {k[len(HEAD_PREFIX) :]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
        lora = {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)}
        try:
            self.head.load_state_dict(head)
            result = set_peft_model_state_dict(self.body, lora, adapter_name=self.adapter_name)
        except RuntimeError as exc:  # a tensor of another shape (another rank or base)
            raise ValueError(f"{directory}: weights do not fit this reward model ({exc})") from exc
        # Other adapters of a shared model are missing from this file by design: only this one's keys count.
        missing = [k for k in result.missing_keys if "lora_" in k and f".{self.adapter_name}." in k]
        if result.unexpected_keys or missing:
            raise ValueError(f"{directory}: LoRA weights do not fit this base ({missing or result.unexpected_keys})")
        self.gain, self.bias = meta["calibration"]["gain"], meta["calibration"]["bias"]

    def reward_fn(self, tokenizer: Tokenizer) -> RewardFn:
        """Normalised scores as a PPO/evaluation reward function (rlhf.ppo.RewardFn)."""

        def reward_fn(prompts: list[Messages], texts: list[str], answer_ids: list[list[int]]) -> torch.Tensor:
            return self.score_texts(tokenizer, prompts, texts)

        return reward_fn


def read_meta(directory: Path) -> dict:
    meta = json.loads((Path(directory) / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}: not a reward model ({meta.get('format')!r}, expected {FORMAT!r})")
    return meta


def _accuracy(wins: torch.Tensor) -> float:
    """Fraction of positive margins, ties counting half (a constant scorer gets 0.5, not 0)."""
    return ((wins > 0).float() + 0.5 * (wins == 0).float()).mean().item()


def _token_counts(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    return torch.tensor([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]])  # (N,)


def evaluate_reward_model(model: RewardModel, tokenizer: Tokenizer, pairs: list[Pair], thumbs: list[Thumb]) -> dict:
    """Held-out pairwise accuracy and loss beside the "longer answer wins" baseline; thumbs accuracy."""
    metrics: dict = {"reward/heldout_pairs": len(pairs), "reward/heldout_thumbs": len(thumbs)}
    if pairs:
        prompts, chosen, rejected = [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs]
        r_chosen = model.raw_scores(tokenizer, prompts, chosen)  # (N,)
        r_rejected = model.raw_scores(tokenizer, prompts, rejected)  # (N,)
        metrics["reward/heldout_loss"] = bradley_terry_loss(r_chosen, r_rejected).item()
        metrics["reward/heldout_accuracy"] = _accuracy(r_chosen - r_rejected)
        # A reward model that does not beat this baseline has learned length (RLHF_NOTES).
        longer = _token_counts(tokenizer, chosen) - _token_counts(tokenizer, rejected)  # (N,)
        metrics["reward/baseline_longer_wins_accuracy"] = _accuracy(longer)
    if thumbs:
        r = model.raw_scores(tokenizer, [t.prompt for t in thumbs], [t.answer for t in thumbs])  # (N,)
        labels = torch.tensor([t.label for t in thumbs], dtype=torch.float32)  # (N,)
        metrics["reward/heldout_thumbs_loss"] = pointwise_loss(r, labels).item()
        # Threshold 0 = P(up) 1/2 under the pointwise loss; meaningless if no thumbs were trained on
        # (Bradley-Terry leaves the offset free).
        metrics["reward/heldout_thumbs_accuracy"] = ((r > 0).float() == labels).float().mean().item()
    return metrics


def _minibatch_loss(
    model: RewardModel, items: list[tuple[list[int], list[list[int]], float | None]], pad_id: int, thumb_weight: float
) -> torch.Tensor:
    """Mean loss per feedback item: Bradley-Terry for pairs, thumb_weight * logistic loss for thumbs.

    items: (prompt ids, [chosen, rejected] or [answer] ids, None for a pair or the thumb's label).
    """
    pairs = [x for x in items if x[2] is None]
    thumbs = [x for x in items if x[2] is not None]
    # Rows: chosen, rejected of each pair in turn, then one row per thumb: one forward pass for all.
    rows = [(prompt, answer) for prompt, answers, _ in pairs + thumbs for answer in answers]
    batch = build_batch([p for p, _ in rows], [a for _, a in rows], pad_id).to(model.device)
    r = model(batch)  # (2 * n_pairs + n_thumbs,)
    total = r.new_zeros(())
    if pairs:
        total = total + len(pairs) * bradley_terry_loss(r[0 : 2 * len(pairs) : 2], r[1 : 2 * len(pairs) : 2])
    if thumbs:
        labels = torch.tensor([label for _, _, label in thumbs], device=r.device)  # (n_thumbs,)
        total = total + thumb_weight * len(thumbs) * pointwise_loss(r[2 * len(pairs) :], labels)
    return total / len(items)


def train_reward_model(
    base_model: PreTrainedModel,
    tokenizer: Tokenizer,
    data: FeedbackData,
    config: RewardConfig,
    progress: Progress | None = None,
    init: Path | None = None,
) -> tuple[RewardModel, dict]:
    """Train a reward model on data's training side, calibrate it on the training answers, and
    evaluate it on the held-out side. progress(step, total, metrics) is called after every step.

    init: a saved reward model to continue from (its LoRA and head), so that what earlier feedback
    taught is kept while this data is learnt; ValueError if its LoRA shape differs from config's."""
    if not data.pairs and not data.thumbs:
        raise ValueError("no training feedback: need at least one comparison or thumb")
    started = time.monotonic()
    model = RewardModel(base_model, config)
    if init is not None:
        model.load_weights(init)
    pad_id = tokenizer.pad_token_id

    # Tokenise once, one row per answer: chosen and rejected of each pair in turn, then the thumbs.
    # item = (prompt ids, answer ids, label), label None marking a comparison.
    prompts = [p.prompt for p in data.pairs for _ in range(2)] + [t.prompt for t in data.thumbs]
    answers = [a for p in data.pairs for a in (p.chosen, p.rejected)] + [t.answer for t in data.thumbs]
    prompt_ids, answer_ids = model.encode(tokenizer, prompts, answers)
    n_pairs = len(data.pairs)
    items = [(prompt_ids[2 * i], answer_ids[2 * i : 2 * i + 2], None) for i in range(n_pairs)]
    items += [(prompt_ids[row], [answer_ids[row]], float(t.label)) for row, t in enumerate(data.thumbs, 2 * n_pairs)]

    params = [p for p in model.parameters() if p.requires_grad]  # the LoRA and the head only
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    steps_per_epoch = -(-len(items) // config.batch_size)
    total = config.epochs * steps_per_epoch
    # Linear decay to zero, as lm-human-preferences' reward training does.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total)
    rng = random.Random(config.seed)
    step, epoch_losses = 0, []
    for _ in range(config.epochs):
        order = rng.sample(range(len(items)), len(items))
        epoch_losses = []
        for start in range(0, len(order), config.batch_size):
            loss = _minibatch_loss(
                model, [items[i] for i in order[start : start + config.batch_size]], pad_id, config.thumb_weight
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            epoch_losses.append(loss.item())
            if progress:
                progress(step, total, {"reward/train_loss": epoch_losses[-1]})

    # The training answers came from the serving policy: calibrate on them (distinct ones only).
    unique = {(conversation_id(p), a): (p, a) for p, a in zip(prompts, answers, strict=True)}
    raw = model.raw_scores(tokenizer, [p for p, _ in unique.values()], [a for _, a in unique.values()])
    model.calibrate(raw)
    metrics = {
        "reward/train_loss": sum(epoch_losses) / len(epoch_losses),  # mean over the last epoch
        "reward/train_pairs": n_pairs,
        "reward/train_thumbs": len(data.thumbs),
        "reward/steps": step,
        "reward/warm_start": float(init is not None),
        "reward/calibration_raw_mean": raw.mean().item(),
        "reward/calibration_raw_std": raw.std().item(),
        **evaluate_reward_model(model, tokenizer, data.heldout_pairs, data.heldout_thumbs),
    }
    metrics["reward/train_seconds"] = time.monotonic() - started
    return model, metrics
