"""Candidate vs current policy on held-out prompts, and the gate that decides promotion.

Both policies answer the same prompts (sampled at the PPO temperature). Reported per policy: mean
reward-model score, KL to the reference (k1, nats per answer), mean answer length and the fraction
of answers that end in EOS; and the candidate's reward-model win rate against the current policy.
The gate accepts only a candidate that scores better, stays within the KL budget and has not
collapsed in length or stopped finishing its answers (that is what reward hacking looks like).
"""

import contextlib
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.conversations import Messages
from common.models import eos_token_ids
from rlhf.config import EvalConfig, GateConfig
from rlhf.modeling import token_logprobs
from rlhf.ppo_math import kl_k1
from rlhf.rollout import RewardFn, forward_answers, generate


@torch.no_grad()
def answer_policy(
    model: PeftModel, adapter: str | None, tokenizer: PreTrainedTokenizerBase, prompts: list[Messages],
    reward_fn: RewardFn, config: EvalConfig,
) -> dict[str, torch.Tensor]:
    """Answers of one policy (an adapter of `model`, or None for the reference) with per-answer stats."""
    eos = eos_token_ids(model, tokenizer)
    torch.manual_seed(config.seed)
    scores, kls, lengths, ended = [], [], [], []
    for start in range(0, len(prompts), config.batch_size):
        chunk = prompts[start : start + config.batch_size]
        with _policy(model, adapter):
            ids, batch = generate(
                model, tokenizer, chunk, config.temperature, config.max_new_tokens, eos, config.precision,
                config.max_prompt_tokens,
            )
            logits, _ = forward_answers(model, batch, config.temperature, precision=config.precision)
        with model.disable_adapter():
            ref_logits, _ = forward_answers(model, batch, config.temperature, precision=config.precision)
        mask = batch.response_mask
        kls.append(kl_k1(token_logprobs(logits, batch.responses), token_logprobs(ref_logits, batch.responses), mask))
        texts = [tokenizer.decode(x, skip_special_tokens=True) for x in ids]
        scores.append(reward_fn(chunk, texts, ids).float().cpu())
        lengths.append(mask.sum(-1).float().cpu())
        ended.append(torch.tensor([float(x[-1] in eos) if x else 0.0 for x in ids]))
    return {"score": torch.cat(scores), "kl": torch.cat(kls).cpu(), "length": torch.cat(lengths),
            "eos": torch.cat(ended)}


@contextlib.contextmanager
def _policy(model: PeftModel, adapter: str | None):
    if adapter is None:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(adapter)
        yield


def summarise(name: str, stats: dict[str, torch.Tensor]) -> dict[str, float]:
    return {f"eval/{name}/{key}": value.mean().item() for key, value in stats.items()}


def gate(metrics: dict[str, float], config: GateConfig) -> tuple[bool, list[str]]:
    """Accept or reject a candidate from compare()'s metrics; every failed check gives a reason."""
    cand, cur = "eval/candidate/", "eval/current/"
    reasons = []
    gain = metrics[cand + "score"] - metrics[cur + "score"]
    if gain <= config.min_score_gain:
        reasons.append(f"reward did not improve: {gain:+.3f} (needs > {config.min_score_gain:+.3f})")
    if metrics[cand + "kl"] > config.max_kl:
        reasons.append(f"KL to reference {metrics[cand + 'kl']:.2f} nats is over the {config.max_kl} budget")
    if metrics[cand + "length"] < config.min_length_ratio * metrics[cur + "length"]:
        reasons.append(
            f"answers collapsed in length: {metrics[cand + 'length']:.1f} vs {metrics[cur + 'length']:.1f} tokens"
        )
    if metrics[cand + "eos"] < metrics[cur + "eos"] - config.max_eos_drop:
        reasons.append(f"fewer answers finish: EOS {metrics[cand + 'eos']:.2f} vs {metrics[cur + 'eos']:.2f}")
    if metrics["eval/win_rate"] < config.min_win_rate:
        reasons.append(f"win rate {metrics['eval/win_rate']:.2f} is under {config.min_win_rate:.2f}")
    return not reasons, reasons


def load_policies(base_model: PreTrainedModel, candidate_dir: Path, current_dir: Path | None) -> PeftModel:
    """The candidate and (if given) the current adapter as "candidate" and "current" of one PeftModel:
    one copy of the base in memory, with the reference (all adapters off) in it too."""
    model = PeftModel.from_pretrained(base_model, candidate_dir, adapter_name="candidate")
    model.eval()
    if current_dir is not None:
        model.load_adapter(current_dir, adapter_name="current")
    return model


def compare_policies(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, reward_fn: RewardFn, prompts: list[Messages],
    config: EvalConfig,
) -> dict[str, float]:
    """Both policies of load_policies' model on the same prompts; without a "current" adapter, the reference."""
    if not prompts:
        raise ValueError("no held-out prompts to evaluate on")
    current_adapter = "current" if "current" in model.peft_config else None
    candidate = answer_policy(model, "candidate", tokenizer, prompts, reward_fn, config)
    current = answer_policy(model, current_adapter, tokenizer, prompts, reward_fn, config)
    wins = (candidate["score"] > current["score"]).float() + 0.5 * (candidate["score"] == current["score"]).float()
    return {
        **summarise("candidate", candidate), **summarise("current", current),
        "eval/win_rate": wins.mean().item(), "eval/prompts": len(prompts),
    }


def compare(
    base_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, reward_fn: RewardFn, prompts: list[Messages],
    candidate_dir: Path, current_dir: Path | None, config: EvalConfig,
) -> dict[str, float]:
    """Both policies on the same prompts; the candidate and current adapters share one base in memory."""
    model = load_policies(base_model, candidate_dir, current_dir)
    return compare_policies(model, tokenizer, reward_fn, prompts, config)
