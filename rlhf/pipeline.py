"""The three training stages as functions of paths: what the CLI and the Celery tasks both call.

    train_reward(data.jsonl)            -> reward model directory (+ metrics)
    train_policy(reward model, prompts) -> candidate adapter directory (+ per-iteration stats): PPO against
                                           the reward model, or (algorithm dpo|kto) TRL on the feedback itself
    evaluate_candidate(candidate)       -> metrics and the gate's accept/reject with reasons

Each stage loads the base it needs itself, so a stage can run in a fresh process (a Celery worker
child) with nothing but paths, and only once: the reward model reads the frozen base, which the policy's
PeftModel holds anyway (adapters disabled), so PPO and evaluation hold one copy of the base weights. Outputs
are written under a temp name and renamed: a stage killed half way leaves nothing that looks finished.
"""

import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from common.records import load_records
from rlhf.config import PipelineConfig, PPOConfig
from rlhf.data import FeedbackData, build_datasets
from rlhf.evaluate import compare_policies, gate, load_policies
from rlhf.modeling import load_base
from rlhf.offline import train_offline
from rlhf.ppo import PPOTrainer
from rlhf.reward import RewardModel, read_meta, train_reward_model

Progress = Callable[[str, int, int, dict], None]  # (stage, step, total, metrics)
STATS_FILE = "ppo_stats.json"


def load_feedback(data_path: Path, heldout_fraction: float, max_records: int = 0) -> FeedbackData:
    """The feedback file's records (the newest max_records of them, if set; the export is oldest first)."""
    records = load_records(data_path)
    return build_datasets(records[-max_records:] if max_records else records, heldout_fraction)


def train_reward(
    data_path: Path, base_path: Path, out_dir: Path, config: PipelineConfig, progress: Progress | None = None,
    cache_dir: Path | None = None,
) -> dict:
    """Train a reward model on an exported feedback file; returns its metrics. cache_dir keeps the base's
    features of answers between runs (rlhf/features.py)."""
    data = load_feedback(data_path, config.heldout_fraction, config.train_window)
    report = (lambda step, total, m: progress("reward", step, total, m)) if progress else None
    base, tokenizer = load_base(base_path, config.device)
    model, metrics = train_reward_model(base, tokenizer, data, config.reward, report, cache_dir)
    model.save(out_dir, {"metrics": metrics, "data": str(data_path), "base_path": str(base_path)})
    return metrics


def reward_data_path(reward_dir: Path) -> Path:
    return Path(read_meta(reward_dir)["metadata"]["data"])


def ppo_iterations(config: PPOConfig, served: int, reward_metrics: dict) -> int:
    """Iterations of a PPO run: all of config.iterations, or the served answers' one alone when there are served
    answers and the reward model that would score fresh samples cannot be shown better than chance (its held-out
    pair accuracy's 95 % lower bound, absent with no held-out pairs, is not above config.min_reward_accuracy)."""
    if not served or config.min_reward_accuracy <= 0:
        return config.iterations
    trusted = reward_metrics.get("reward/heldout_accuracy_low", 0.0) > config.min_reward_accuracy
    return config.iterations if trusted else 1


def ppo_trainer(
    reward_dir: Path, base_path: Path, config: PPOConfig, init_adapter: Path | None = None, device: str = "cpu"
) -> tuple[PPOTrainer, RewardModel]:
    """A trainer whose reward model reads the policy's own base (adapters disabled): policy, reference and
    reward model on one copy of the base weights."""
    base, tokenizer = load_base(base_path, device)
    trainer = PPOTrainer(base, tokenizer, None, config, init_adapter)
    reward_model = RewardModel.load(reward_dir)
    trainer.reward_fn = reward_model.reward_fn(trainer.policy, tokenizer)
    return trainer, reward_model


def train_policy(
    reward_dir: Path, base_path: Path, out_dir: Path, config: PipelineConfig, init_adapter: Path | None = None,
    data_path: Path | None = None, progress: Progress | None = None, init_version: str | None = None,
) -> list[dict]:
    """The new adapter, starting from init_adapter: PPO against the reward model on the prompts users sent,
    or DPO / KTO (TRL) on the training side of the feedback itself; the reward model then only judges
    the candidate in evaluate_candidate, the same gate for every algorithm. init_version names the starting
    policy in the feedback records: PPO takes the answers it served as its first batch."""
    window = config.offline.window if config.algorithm in ("dpo", "kto") else config.train_window
    data = load_feedback(data_path or reward_data_path(reward_dir), config.heldout_fraction, window)
    if config.algorithm in ("dpo", "kto"):
        base, tokenizer = load_base(base_path, config.device)
        offline = replace(config.offline, algorithm=config.algorithm)
        report = (lambda step, total, logs: progress(config.algorithm, step, total, logs)) if progress else None
        history = train_offline(base, tokenizer, data, offline, init_adapter, out_dir, report)
        (out_dir / STATS_FILE).write_text(json.dumps({"config": asdict(offline), "history": history}, default=str))
        return history
    if config.algorithm != "ppo":
        raise ValueError(f"unknown algorithm {config.algorithm!r}: ppo, dpo or kto")
    if not data.prompts:
        raise ValueError("no training prompts in the feedback data")
    ppo = config.ppo
    trainer, _ = ppo_trainer(reward_dir, base_path, ppo, init_adapter, config.device)
    served = data.served(init_version, ppo.temperature, ppo.served_batch, ppo.served_thumbs) if init_version else []
    iterations = ppo_iterations(ppo, len(served), read_meta(reward_dir)["metadata"].get("metrics", {}))
    report = (lambda i, stats: progress("ppo", i, iterations, stats)) if progress else None
    history = trainer.train(data.prompts, iterations, report, served, config.gate.max_kl, config.eval.prompts)
    trainer.save_adapter(out_dir)
    (out_dir / STATS_FILE).write_text(json.dumps({"config": asdict(ppo), "history": history}, default=str))
    return history


def untrained_reason(algorithm: str, history: list[dict], gate_max_kl: float) -> str | None:
    """Why a PPO run left its adapter as it started (every iteration stopped before its first optimiser step: its
    starting policy had no KL room left; or the run ended past the budget and was pulled back all the way), or None
    if it trained. Such a candidate is its parent: nothing to test."""
    if algorithm != "ppo":
        return None
    if history and history[-1].get("ppo/budget_scale") == 0.0:
        return (f"pulled back to its start: every step it took ended past the gate's budget of {gate_max_kl:g} nats "
                f"(last measured {history[-1]['ppo/budget_kl']:.1f})")
    if any(h.get("ppo/steps", 0) for h in history):
        return None
    start_kl = next((h["ppo/start_kl"] for h in history if "ppo/start_kl" in h), None)
    where = f"already {start_kl:.1f} nats from the reference" if start_kl is not None else "at its KL budget"
    return f"no training step: the starting policy is {where}, with the gate's budget at {gate_max_kl:g}"


def eval_models(
    reward_dir: Path, base_path: Path, candidate_dir: Path, current_adapter: Path | None = None, device: str = "cpu"
) -> tuple[PeftModel, PreTrainedTokenizerBase, RewardModel]:
    """Candidate and current as two adapters of one PeftModel; the reward model reads its base."""
    base, tokenizer = load_base(base_path, device)
    model = load_policies(base, candidate_dir, current_adapter)
    return model, tokenizer, RewardModel.load(reward_dir)


def evaluate_candidate(
    candidate_dir: Path, reward_dir: Path, base_path: Path, config: PipelineConfig, current_adapter: Path | None = None,
    data_path: Path | None = None,
) -> dict:
    """The candidate against the current policy on held-out prompts; metrics plus the gate's verdict."""
    data = load_feedback(data_path or reward_data_path(reward_dir), config.heldout_fraction, config.train_window)
    # Held-out prompts first; when they are few (a tenth of a young run's prompts is a handful), training
    # prompts fill up to config.eval.prompts: a verdict on 7 answers is a coin toss, and the candidate's answers
    # are fresh samples either way.
    prompts = [*data.heldout_prompts, *data.prompts][: config.eval.prompts]
    model, tokenizer, reward_model = eval_models(reward_dir, base_path, candidate_dir, current_adapter, config.device)
    started = time.monotonic()
    metrics = compare_policies(model, tokenizer, reward_model.reward_fn(model, tokenizer), prompts, config.eval)
    metrics["eval/seconds"] = time.monotonic() - started
    metrics["eval/heldout"] = min(len(data.heldout_prompts), len(prompts)) / len(prompts)  # held-out share
    accepted, reasons = gate(metrics, config.gate)
    return {"metrics": metrics, "accepted": accepted, "reasons": reasons}
