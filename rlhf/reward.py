"""Reward model: a scalar score for (prompt, answer), learned from comparisons and thumbs.

A linear head on the frozen base's pooled hidden states (rlhf/features.py). Pairs train it with the
Bradley-Terry loss; unpaired thumbs with a pointwise logistic loss on the same scalar, so they count too.
Features are standardised on the training answers; `ensemble` heads are fit, the first on every vote and
each other on a bootstrap resample, and their scores average (less variance where the votes are few).
PPO consumes normalised scores, gain * raw + bias, with gain and bias set so the serving policy's answers
score mean 0, std 1 (OpenAI's lm-human-preferences sets its reward gain and bias the same way).

The base being frozen is what makes this cheap and exact to share: the reward model needs no weights of its own
in the LM, scores with every adapter of a policy's PeftModel disabled (the reference, which PPO holds anyway),
and its features of an answer never change, so they are cached across runs.
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
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.conversations import Messages
from common.models import eos_token_ids
from common.records import Origin, Pair, Thumb
from rlhf.config import RewardConfig
from rlhf.data import FeedbackData
from rlhf.features import FeatureCache, answer_key, compute_features, feature_signature
from rlhf.rollout import RewardFn

FORMAT = "chatloop-reward-model/2"
WEIGHTS_FILE = "reward_model.safetensors"
META_FILE = "reward_model.json"

Progress = Callable[[int, int, dict], None]
Tokenizer = PreTrainedTokenizerBase


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """mean(-log sigmoid(r_chosen - r_rejected)); logsigmoid stays finite for large margins."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pointwise_loss(r: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logistic loss of thumbs (1 up, 0 down) with the raw score as the logit of "up"."""
    return F.binary_cross_entropy_with_logits(r, labels.to(r.dtype))


class RewardHead(torch.nn.Module):
    """Standardisation and E linear heads; the raw score is their mean. Features (N, D) -> scores (N,)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)  # (D,)
        self.register_buffer("std", std)  # (D,)
        self.register_buffer("weight", weight)  # (E, D)
        self.register_buffer("bias", bias)  # (E,)

    def members(self, features: torch.Tensor) -> torch.Tensor:
        """Each head's score. (N, E)"""
        return ((features.float() - self.mean) / self.std) @ self.weight.T + self.bias

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.members(features).mean(-1)


def fit_linear(
    z: torch.Tensor, pairs: torch.Tensor, thumbs: torch.Tensor, labels: torch.Tensor, config: RewardConfig,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, b) minimising the mean Bradley-Terry loss of pairs (P, 2: chosen, rejected rows of z), plus
    thumb_weight times the logistic loss of thumbs (rows of z, with labels), plus l2 * |w|^2. `weights` count
    each pair then each thumb that many times (a bootstrap resample). L-BFGS: the problem is convex."""
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    z = z.double()
    n = len(pairs) + len(thumbs)
    weights = torch.ones(n, dtype=torch.float64) if weights is None else weights.double()
    pair_w, thumb_w = weights[: len(pairs)], weights[len(pairs) :]
    optimizer = torch.optim.LBFGS([w, b], max_iter=config.max_steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        r = z @ w + b
        loss = w.new_zeros(())
        if len(pairs):
            loss = loss + (pair_w * -F.logsigmoid(r[pairs[:, 0]] - r[pairs[:, 1]])).sum()
        if len(thumbs):
            bce = F.binary_cross_entropy_with_logits(r[thumbs], labels.double(), reduction="none")
            loss = loss + config.thumb_weight * (thumb_w * bce).sum()
        loss = loss / weights.sum() + config.l2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach().float(), b.detach().float()


def fit_head(
    features: torch.Tensor, pairs: torch.Tensor, thumbs: torch.Tensor, labels: torch.Tensor, config: RewardConfig
) -> RewardHead:
    """An ensemble head on these features (rows), pairs (P, 2) and thumbs (T,) with labels (T,)."""
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    z = (features - mean) / std
    n = len(pairs) + len(thumbs)
    generator = torch.Generator().manual_seed(config.seed)
    ws, bs = [], []
    for member in range(config.ensemble):
        # Poisson(1) counts: the bootstrap's resample without a fixed size; the first head sees every vote once.
        counts = None if member == 0 else torch.poisson(torch.ones(n), generator=generator)
        w, b = fit_linear(z, pairs, thumbs, labels, config, counts)
        ws.append(w)
        bs.append(b)
    return RewardHead(mean, std, torch.stack(ws), torch.stack(bs))


class RewardModel:
    """A fitted head, its calibration, and how to get features for it from a model."""

    def __init__(self, head: RewardHead, config: RewardConfig, base_name: str, gain: float = 1.0,
                 bias: float = 0.0) -> None:
        self.head, self.config, self.base_name = head, config, base_name
        self.gain, self.bias = gain, bias

    def raw(self, features: torch.Tensor) -> torch.Tensor:
        """Raw scores of feature rows. (N,)"""
        return self.head(features)

    def normalised(self, features: torch.Tensor) -> torch.Tensor:
        """Scores for PPO: mean 0, std 1 on the serving policy's answers. (N,)"""
        return self.gain * self.raw(features) + self.bias

    def calibrate(self, raw: torch.Tensor) -> None:
        """Set gain and bias so these raw scores (answers of the current policy) get mean 0, std 1."""
        raw = raw.detach().double()
        if raw.numel() < 2 or not torch.isfinite(raw).all() or raw.std() == 0:
            raise ValueError("calibration needs at least two finite, distinct scores")
        self.gain = 1.0 / raw.std().item()
        self.bias = -self.gain * raw.mean().item()

    def features(self, model: torch.nn.Module, tokenizer: Tokenizer, prompts: list[Messages],
                 answers: list[str], ended: list[bool] | None = None) -> torch.Tensor:
        """The base's features of these answers: with every adapter of a PeftModel disabled. (N, D)"""
        context = model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()
        with context:
            return compute_features(model, tokenizer, prompts, answers, self.config, ended=ended)

    def reward_fn(self, model: torch.nn.Module, tokenizer: Tokenizer) -> RewardFn:
        """Normalised scores as a PPO/evaluation reward function (rlhf.rollout.RewardFn), the features coming from
        `model`'s base (a policy's PeftModel shares its weights)."""
        eos = eos_token_ids(model, tokenizer)

        def reward_fn(prompts: list[Messages], texts: list[str], answer_ids: list[list[int]]) -> torch.Tensor:
            ended = [bool(ids) and ids[-1] in eos for ids in answer_ids]
            return self.normalised(self.features(model, tokenizer, prompts, texts, ended))

        return reward_fn

    def save(self, directory: Path, metadata: dict | None = None) -> Path:
        """Write the head (safetensors) and a JSON description under a temp name, then rename: a reader sees the
        whole directory or none of it. Versions are never overwritten."""
        directory = Path(directory)
        if directory.exists():
            raise FileExistsError(f"{directory} already exists; a reward model version is never overwritten")
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, tmp / WEIGHTS_FILE)
            meta = {
                "format": FORMAT, "created_at": datetime.now(UTC).isoformat(), "base_model": self.base_name,
                "config": asdict(self.config), "calibration": {"gain": self.gain, "bias": self.bias},
                "metadata": metadata or {},
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
            os.rename(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory: Path) -> "RewardModel":
        meta = read_meta(directory)
        tensors = load_file(Path(directory) / WEIGHTS_FILE)
        head = RewardHead(tensors["mean"], tensors["std"], tensors["weight"], tensors["bias"])
        calibration = meta["calibration"]
        return cls(head, RewardConfig.from_dict(meta["config"]), meta["base_model"], calibration["gain"],
                   calibration["bias"])


def read_meta(directory: Path) -> dict:
    meta = json.loads((Path(directory) / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}: not a reward model of this version ({meta.get('format')!r}, expected "
                         f"{FORMAT!r})")
    return meta


def accuracy(margins: torch.Tensor) -> float:
    """Fraction of positive margins, ties counting half (a constant scorer gets 0.5, not 0)."""
    return ((margins > 0).float() + 0.5 * (margins == 0).float()).mean().item()


def accuracy_interval(margins: torch.Tensor, bootstrap: int, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of accuracy(margins)."""
    if margins.numel() == 0:
        return 0.0, 1.0
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(len(margins), (bootstrap, len(margins)), generator=generator)
    right = (margins > 0).float() + 0.5 * (margins == 0).float()
    draws = right[rows].mean(-1).sort().values
    return draws[int(0.025 * (bootstrap - 1))].item(), draws[int(0.975 * (bootstrap - 1))].item()


def _ended(origin: Origin) -> bool:
    """Whether a served answer stopped at EOS; an answer of unknown origin (imported) is taken as finished."""
    return origin.finish_reason != "length"


class VoteSet:
    """Votes as rows of one feature matrix: every distinct answer once, pairs and thumbs as row indexes."""

    def __init__(self, pairs: list[Pair], thumbs: list[Thumb]) -> None:
        self.rows: dict[str, int] = {}
        self.prompts: list[Messages] = []
        self.answers: list[str] = []
        self.ended: list[bool] = []
        rows = [(self._row(p.prompt, p.chosen, _ended(p.origins[0])), self._row(p.prompt, p.rejected,
                                                                              _ended(p.origins[1]))) for p in pairs]
        self.pairs = torch.tensor(rows, dtype=torch.long).reshape(-1, 2)  # (P, 2)
        self.thumbs = torch.tensor([self._row(t.prompt, t.answer, _ended(t.origin)) for t in thumbs],
                                   dtype=torch.long)  # (T,)
        self.labels = torch.tensor([float(t.label) for t in thumbs])  # (T,)

    def _row(self, prompt: Messages, answer: str, ended: bool) -> int:
        key = answer_key(prompt, answer, ended)
        if key not in self.rows:
            self.rows[key] = len(self.answers)
            self.prompts.append(prompt)
            self.answers.append(answer)
            self.ended.append(ended)
        return self.rows[key]


def _token_counts(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    if not texts:
        return torch.zeros(0)
    return torch.tensor([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]])  # (N,)


def evaluate_votes(scores: torch.Tensor, votes: VoteSet, tokenizer: Tokenizer, config: RewardConfig) -> dict:
    """Held-out accuracy on the pairs (with its 95 % interval) beside the "longer answer wins" baseline (a reward
    model that does not beat it has learned length); thumbs accuracy at the P(up) = 1/2 threshold."""
    metrics: dict = {"reward/heldout_pairs": len(votes.pairs), "reward/heldout_thumbs": len(votes.thumbs)}
    if len(votes.pairs):
        chosen, rejected = scores[votes.pairs[:, 0]], scores[votes.pairs[:, 1]]
        low, high = accuracy_interval(chosen - rejected, config.bootstrap, config.seed)
        lengths = _token_counts(tokenizer, votes.answers)
        metrics |= {
            "reward/heldout_loss": bradley_terry_loss(chosen, rejected).item(),
            "reward/heldout_accuracy": accuracy(chosen - rejected),
            "reward/heldout_accuracy_low": low,
            "reward/heldout_accuracy_high": high,
            "reward/baseline_longer_wins_accuracy": accuracy(lengths[votes.pairs[:, 0]] - lengths[votes.pairs[:, 1]]),
        }
    if len(votes.thumbs):
        r = scores[votes.thumbs]
        metrics["reward/heldout_thumbs_loss"] = pointwise_loss(r, votes.labels).item()
        metrics["reward/heldout_thumbs_accuracy"] = ((r > 0).float() == votes.labels).float().mean().item()
    return metrics


def train_reward_model(
    base_model: PreTrainedModel, tokenizer: Tokenizer, data: FeedbackData, config: RewardConfig,
    progress: Progress | None = None, cache_dir: Path | None = None,
) -> tuple[RewardModel, dict]:
    """Fit a reward model on data's training side, calibrate it on the training answers (the serving policy's),
    and evaluate it on the held-out side. Features come from (and go to) the cache in cache_dir, if given;
    progress(done, total, metrics) reports the feature extraction, the slow part."""
    if not data.pairs and not data.thumbs:
        raise ValueError("no training feedback: need at least one comparison or thumb")
    started = time.monotonic()
    train, heldout = VoteSet(data.pairs, data.thumbs), VoteSet(data.heldout_pairs, data.heldout_thumbs)
    cache = FeatureCache(cache_dir, feature_signature(config, str(base_model.name_or_path)))
    report = (lambda done, total: progress(done, total, {})) if progress else None
    prompts, answers = train.prompts + heldout.prompts, train.answers + heldout.answers
    ended = train.ended + heldout.ended
    features = cache.features(base_model, tokenizer, prompts, answers, config, report, ended)  # (N, D)
    cache.keep({answer_key(p, a, e) for p, a, e in zip(prompts, answers, ended, strict=True)})
    featured = time.monotonic()
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    train_features, heldout_features = features[: len(train.answers)], features[len(train.answers) :]
    head = fit_head(train_features, train.pairs, train.thumbs, train.labels, config)
    model = RewardModel(head, config, str(base_model.name_or_path))
    raw = model.raw(train_features)
    model.calibrate(raw)
    metrics = {
        "reward/train_pairs": len(train.pairs), "reward/train_thumbs": len(train.thumbs),
        "reward/train_accuracy": accuracy(raw[train.pairs[:, 0]] - raw[train.pairs[:, 1]]) if len(train.pairs)
        else float("nan"),
        "reward/answers": len(answers), "reward/cached_answers": len(answers) - cache.computed,
        "reward/calibration_raw_mean": raw.mean().item(), "reward/calibration_raw_std": raw.std().item(),
        **evaluate_votes(model.raw(heldout_features), heldout, tokenizer, config),
        "reward/feature_seconds": featured - started,
        "reward/train_seconds": time.monotonic() - started,
    }
    return model, metrics
