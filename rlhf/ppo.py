"""PPO on a LoRA adapter against a reward function, with a KL penalty to the adapter-disabled base.

One step is lm-human-preferences' pipeline: `rollouts = sample(prompts)`, `scores = score(rollouts)`,
`rewards = compute_rewards(scores, logprobs, ref_logprobs)`, `stats = train_minibatches(...)`.
The policy is the base wrapped in a peft LoRA adapter; the reference is the same model under
`disable_adapter()` (one copy of the weights); the value head, when there is one (critic=True: GAE),
is a Linear on the policy's last hidden states (shared trunk). Without it (critic=False, the service's
default) every token's advantage is the answer's score baselined on its group siblings (RLOO), and
with kl_penalty="loss" the KL to the reference is a term of the loss rather than a per-token reward: k3 weighted
by pi / pi_old, which stays right on answers the policy did not sample itself (served ones, later epochs).
The first iteration of a run trains on answers production served, rewarded by their users' votes, by default as
a contrast (step_shape): DPO's step shape under PPO's loss, no clip and no KL term, stopped by a KL budget.
Every logprob used for the ratio and the KL is recomputed here, in the trainer's own precision, with
logits divided by the sampling temperature (Huang et al., "The N Implementation Details of RLHF with PPO").
"""

import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.conversations import Messages, conversation_id
from common.models import eos_token_ids
from rlhf.config import EvalConfig, PPOConfig
from rlhf.data import Served, unique_prompts
from rlhf.kl_budget import fit_budget, measure_distance
from rlhf.modeling import (
    TokenBatch,
    answer_ids,
    build_batch,
    encode_prompt,
    peft_config,
    save_adapter,
    token_logprobs,
)
from rlhf.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    compute_rewards,
    entropy_from_logits,
    gae,
    kl_k1,
    kl_k3,
    kl_k3_weighted_tokens,
    leave_one_out_groups,
    masked_mean,
    masked_var,
    minibatches,
    policy_loss,
    value_loss,
    whiten,
)
from rlhf.rollout import RewardFn, Rollouts, ValueHead, forward_answers, generate


@dataclass(frozen=True)
class StepShape:
    """How an iteration trains on its batch: answers a gradient step, whether a group's answers share a step,
    passes over the batch, the clip of pi / pi_old, the weight of the KL to the reference, and where the pass stops:
    before a minibatch whose answers measure more than max_kl nats per answer from the policy that started the
    iteration (k3 estimate of KL(pi_old || pi) on them, before they are trained on; inf: never)."""

    minibatch_size: int
    groups_together: bool
    epochs: int
    cliprange: float
    kl_coef: float
    max_kl: float = float("inf")


def step_shape(config: PPOConfig, kl_coef: float, served: bool = False) -> StepShape:
    """A fresh iteration's shape (and the served one's with served_step "clipped"): the config's own. The served
    iteration with served_step "contrast" takes DPO's: minibatch_size comparisons (a conversation's answers) a step,
    one pass, no clip and no KL term, so each step contrasts the log-likelihoods of the answers voted up with
    those voted down and nothing pulls it back within a step; the pass stops once the answers it has not yet
    trained on measure config.max_kl nats from the starting policy (served answers are its samples)."""
    if served and config.served_step == "contrast":
        return StepShape(2 * config.minibatch_size, True, 1, float("inf"), 0.0, config.max_kl or float("inf"))
    return StepShape(config.minibatch_size, config.minibatch_groups, config.epochs, config.cliprange, kl_coef)


class PPOTrainer:
    def __init__(
        self, base_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, reward_fn: RewardFn | None,
        config: PPOConfig, init_adapter_dir: Path | None = None,
    ) -> None:
        """Wraps base_model in place with the trainable adapter: a copy of init_adapter_dir's, or a fresh one.

        reward_fn may be set after construction instead, once self.policy exists: a reward model that joins
        self.policy as an adapter of its own (rlhf.reward.RewardModel) shares its copy of the base weights."""
        torch.manual_seed(config.seed)
        self.config, self.tokenizer, self.reward_fn = config, tokenizer, reward_fn
        if init_adapter_dir is not None:
            self.policy = PeftModel.from_pretrained(base_model, init_adapter_dir, is_trainable=True)
        else:
            self.policy = get_peft_model(base_model, peft_config(config.lora))
        # A fresh adapter's B matrices are 0: until the first optimiser step the policy is the reference itself, and
        # the reference's forward pass can be skipped (half of a first batch's logprob work)
        self.at_reference = init_adapter_dir is None
        self.policy.eval()  # dropout off in rollouts and updates alike; eval mode still lets gradients through
        self.device = base_model.device
        self.value_head = ValueHead(base_model.config.hidden_size).to(self.device) if config.critic else None
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.value_head is not None:
            self.params += list(self.value_head.parameters())
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr, eps=1e-5)
        if config.adaptive_kl:
            self.kl_ctl = AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(config.kl_coef)
        self.eos_ids = eos_token_ids(base_model, tokenizer)
        self.rng = random.Random(config.seed)

    def train(
        self, prompt_pool: list[Messages], iterations: int, progress: Callable[[int, dict], None] | None = None,
        served: list[Served] | None = None, kl_limit: float = float("inf"), budget_prompts: int = EvalConfig.prompts,
    ) -> list[dict[str, float]]:
        """`iterations` PPO steps on prompts drawn from the pool; progress(iteration, stats) after each.

        served: answers served to users at this temperature, by the starting policy (exact samples of it) or by a
        neighbour of it (rlhf.data.FeedbackData.served). They make the first iteration's batch instead of fresh
        samples: free rollouts, often many more than one batch. kl_limit: the most nats per answer a candidate may
        end from the reference (the gate's budget, GateConfig.max_kl); the contrast's stop leaves room for the
        starting policy's own distance (step_served), and a run that still ends past it is pulled back
        (rlhf.kl_budget.fit_budget; both measured on budget_prompts prompts, the gate's count: ppo/budget_*)."""
        history = []
        group = self.config.group_size
        if self.config.batch_size % group:
            raise ValueError(f"batch_size {self.config.batch_size} is not a multiple of group_size {group}")
        # the parameters the run starts from, for the fit to pull back to (only when it may run)
        start = [p.detach().clone() for p in self.params] if self.fits_budget(kl_limit) else []
        start_at_reference = self.at_reference
        for iteration in range(1, iterations + 1):
            if iteration == 1 and served:
                history.append(self.step_served(served, kl_limit, budget_prompts))
            else:
                history.append(self.step(self.draw_prompts(prompt_pool)))
            if progress is not None:
                progress(iteration, history[-1])
            if history[-1].get("ppo/over_max_kl"):
                break
        if self.fits_budget(kl_limit) and any(h.get("ppo/steps") for h in history):
            history[-1] |= fit_budget(
                self, start, start_at_reference, history, prompt_pool, kl_limit, budget_prompts)
            if progress is not None:  # the last iteration again, with where the run ends
                progress(len(history), history[-1])
        return history

    def fits_budget(self, kl_limit: float) -> bool:
        """Whether a run that trains is pulled back within kl_limit at its end (rlhf.kl_budget.fit_budget)."""
        return kl_limit < float("inf") and self.config.budget_trials > 0

    def draw_prompts(self, prompt_pool: list[Messages]) -> list[Messages]:
        """A fresh batch's prompts: batch_size / group_size drawn from the pool, each group_size times."""
        group = self.config.group_size
        k = self.config.batch_size // group
        pool = self.rng.sample(prompt_pool, k) if len(prompt_pool) >= k else self.rng.choices(prompt_pool, k=k)
        return [p for p in pool for _ in range(group)]

    def step(self, prompts: list[Messages]) -> dict[str, float]:
        """One PPO iteration on fresh samples, one answer per entry of prompts (with group_size > 1: consecutive
        groups of that many copies of one prompt); returns the iteration's stats. When the samples put the policy
        more than config.max_kl nats from the reference, the batch is not trained on and the run stops there
        (stats["ppo/over_max_kl"]): the gate would refuse a candidate further out."""
        start = time.perf_counter()
        answer_ids, batch = self.generate(prompts)
        generated = time.perf_counter()
        group = self.config.group_size
        groups = torch.arange(len(prompts), device=self.device) // group if group > 1 else None
        rollouts = self.recompute(prompts, answer_ids, batch)
        kl = sample_distance(rollouts)
        if self.config.max_kl and kl > self.config.max_kl:  # the policy's own samples: the gate's own measure
            return {"objective/kl": kl, "ppo/over_max_kl": 1.0, "ppo/batch": float(len(prompts)),
                    "time/generate_s": generated - start, "time/forward_s": rollouts.seconds, "time/score_s": 0.0,
                    "time/update_s": 0.0, "time/rollout_s": time.perf_counter() - start}
        stats = self.update(rollouts, groups, step_shape(self.config, self.kl_ctl.value))
        stats["time/generate_s"] = generated - start
        stats["time/rollout_s"] += generated - start
        return stats

    def step_served(
        self, served: list[Served], kl_limit: float = float("inf"), budget_prompts: int = EvalConfig.prompts,
    ) -> dict[str, float]:
        """One PPO iteration on served answers, rewarded by their users' own votes (+1 or -1) rather than by the
        reward model: a vote is the preference itself, a reward model only its estimate. Answers another version
        wrote are trained on as if the starting policy had sampled them (pi_old is the starting policy's own
        logprob). Answers to one conversation are each other's baseline. How it steps is step_shape's: by default
        a contrast (minibatch_size comparisons a step, one pass, stopped at max_kl nats from the starting policy);
        with served_step "clipped", as a fresh iteration steps, taking as many more optimiser steps as it holds
        more answers. The contrast's stop is the nearer of max_kl from the starting policy and what kl_limit leaves
        once the starting policy's own distance to the reference (start_kl, start_distance on budget_prompts) is
        spent. A start with no room left takes no step."""
        prompts = [s.prompt for s in served]
        answer_ids = [self.served_ids(s) for s in served]
        batch = build_batch([encode_prompt(self.tokenizer, p)[-self.config.max_prompt_tokens :] for p in prompts],
                            answer_ids,
                            self.tokenizer.pad_token_id).to(self.device)
        keys = {conversation_id(p): i for i, p in enumerate(prompts)}
        groups = torch.tensor([keys[conversation_id(p)] for p in prompts], device=self.device)
        votes = torch.tensor([s.vote for s in served], device=self.device)
        shape = step_shape(self.config, self.kl_ctl.value, served=True)
        rollouts = self.recompute(prompts, answer_ids, batch)
        room = {}
        if shape.max_kl < float("inf") or self.fits_budget(kl_limit):  # the stop and the fit start from it
            start_kl = 0.0 if self.at_reference else self.start_distance(rollouts, served, budget_prompts)
            room["ppo/start_kl"] = start_kl
        if shape.max_kl < float("inf"):  # the contrast with its stop: the nearer of the two
            shape = replace(shape, max_kl=max(0.0, min(shape.max_kl, kl_limit - start_kl)))
            room["ppo/kl_room"] = shape.max_kl
        stats = self.update(rollouts, groups, shape, votes)
        on_policy = float(sum(s.on_policy for s in served))
        return stats | room | {"time/generate_s": 0.0, "ppo/served": float(len(served)),
                               "ppo/served_on_policy": on_policy}

    def start_distance(self, rollouts: Rollouts, served: list[Served], prompts: int) -> float:
        """The starting policy's KL to the reference, nats per answer, on its own samples (the gate's measure): the
        served answers it wrote, or when it wrote none (others' answers would make it look nearer) one fresh answer
        to each of `prompts` served prompts, distinct ones as far as they go (rlhf.kl_budget.measure_distance)."""
        own = own_distance(rollouts, [s.on_policy for s in served])
        if own is not None:
            return own
        return measure_distance(self, unique_prompts(served), prompts)[0]

    def served_ids(self, served: Served) -> list[int]:
        """A served answer's tokens as the policy would have emitted them: EOS only if it stopped there."""
        return answer_ids(self.tokenizer, served.text, served.ended, self.config.max_new_tokens)

    def update(
        self, rollouts: Rollouts, groups: torch.Tensor | None, shape: StepShape, scores: torch.Tensor | None = None
    ) -> dict[str, float]:
        """Score the rollouts (unless their scores are given), baseline each score on its group's other answers
        (groups: a group id per answer; None: no baseline, the critic's job), and train on them."""
        c = self.config
        start = time.perf_counter()
        raw_scores, scores = self.score(rollouts) if scores is None else (scores, scores)
        scored = time.perf_counter()
        mask = rollouts.batch.response_mask
        baselined = scores if groups is None else leave_one_out_groups(scores, groups)
        reward_kl_coef = shape.kl_coef if c.kl_penalty == "reward" else 0.0
        rewards, kl = compute_rewards(baselined, rollouts.logprobs, rollouts.ref_logprobs, mask, reward_kl_coef)
        if c.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        # Without a critic (values 0) and lambda 1, GAE is the plain reward-to-go
        advantages, returns = gae(rewards, rollouts.values, mask, c.gamma, c.lam if c.critic else 1.0)
        advantages = whiten(advantages, mask)
        advantaged = time.perf_counter()
        stats = self.train_minibatches(rollouts, advantages, returns, shape, groups if shape.groups_together else None)
        update_s = time.perf_counter() - advantaged

        mean_kl = kl.sum(-1).mean().item()
        lengths = mask.sum(-1).float()
        stats |= {
            "objective/score": scores.mean().item(),
            "objective/raw_score": raw_scores.mean().item(),
            "objective/kl": mean_kl,
            "objective/kl_k3": kl_k3(rollouts.logprobs, rollouts.ref_logprobs, mask).mean().item(),
            "objective/kl_coef": shape.kl_coef,
            "objective/entropy": (rollouts.entropy * mask).sum(-1).mean().item(),  # nats per answer
            "ppo/mean_length": lengths.mean().item(),
            "ppo/eos_fraction": rollouts.has_eos.float().mean().item(),
            "ppo/batch": float(len(rollouts.prompts)),
            "time/rollout_s": rollouts.seconds + advantaged - start,  # forward, scoring, rewards and advantages
            "time/forward_s": rollouts.seconds,  # logprobs, values and reference logprobs of the answers
            "time/score_s": scored - start,  # the reward function
            "time/update_s": update_s,
        }
        if c.critic:
            stats["ppo/val/explained_variance"] = explained_variance(rollouts.values, returns, mask)
        self.kl_ctl.update(mean_kl, len(rollouts.prompts))
        return stats

    def sample(self, prompts: list[Messages]) -> Rollouts:
        """Sample one answer per prompt, then recompute logprobs, values and reference logprobs."""
        return self.recompute(prompts, *self.generate(prompts))

    def generate(self, prompts: list[Messages]) -> tuple[list[list[int]], TokenBatch]:
        c = self.config
        return generate(
            self.policy, self.tokenizer, prompts, c.temperature, c.max_new_tokens, self.eos_ids, c.precision,
            c.max_prompt_tokens,
        )

    @torch.no_grad()
    def recompute(self, prompts: list[Messages], answer_ids: list[list[int]], batch: TokenBatch) -> Rollouts:
        """Logprobs, values and reference logprobs of sampled answers, in the trainer's own precision, batch_size
        rows at a time: a served batch of 256 answers in one pass would hold (256, R, V) logits, 3 GB in fp32, and
        took 0.75-0.95 s an answer where 16-row passes took 0.5-0.65 s (bench/RESULTS.md, the learning benchmark)."""
        c = self.config
        start = time.perf_counter()
        parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        for rows in torch.arange(len(answer_ids), device=self.device).split(c.batch_size):
            chunk = batch.select(rows)
            logits, values = forward_answers(self.policy, chunk, c.temperature, self.value_head, c.precision)
            if self.at_reference:
                ref_logits = logits
            else:
                with self.policy.disable_adapter():
                    ref_logits, _ = forward_answers(self.policy, chunk, c.temperature, precision=c.precision)
            parts["logprobs"].append(token_logprobs(logits, chunk.responses))
            parts["ref_logprobs"].append(token_logprobs(ref_logits, chunk.responses))
            parts["values"].append(values if values is not None else torch.zeros_like(logits[..., 0]))
            parts["entropy"].append(entropy_from_logits(logits))
        return Rollouts(
            prompts=prompts,
            answer_texts=[self.tokenizer.decode(ids, skip_special_tokens=True) for ids in answer_ids],
            answer_ids=answer_ids,
            batch=batch,
            has_eos=torch.tensor([ids[-1] in self.eos_ids for ids in answer_ids], device=self.device),
            **{name: torch.cat(tensors) for name, tensors in parts.items()},
            seconds=time.perf_counter() - start,
        )

    def score(self, rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw reward-function scores, scores with truncated answers replaced by the missing-EOS penalty)."""
        raw = self.reward_fn(rollouts.prompts, rollouts.answer_texts, rollouts.answer_ids).float().to(self.device)
        if self.config.missing_eos_penalty is None:
            return raw, raw
        return raw, torch.where(rollouts.has_eos, raw, torch.full_like(raw, self.config.missing_eos_penalty))

    def train_minibatches(
        self, rollouts: Rollouts, advantages: torch.Tensor, returns: torch.Tensor, shape: StepShape,
        groups: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """shape.epochs passes over the rollout batch in shuffled minibatches (with groups: a group's answers in
        one minibatch, ppo_math.minibatches), stopping at shape.max_kl; the mean of each loss term, and the steps
        taken. No KL term when shape.kl_coef is 0."""
        c = self.config
        totals = defaultdict(list)
        for _ in range(shape.epochs):
            for rows in minibatches(len(rollouts.prompts), shape.minibatch_size, groups):
                rows = rows.to(self.device)
                batch, mask = rollouts.batch.select(rows), rollouts.batch.response_mask[rows]
                logits, values = forward_answers(self.policy, batch, c.temperature, self.value_head, c.precision)
                logprobs = token_logprobs(logits, batch.responses)  # (b, R)
                if shape.max_kl < float("inf"):
                    moved = kl_k3(rollouts.logprobs[rows], logprobs.detach(), mask).mean().item()
                    totals["ppo/step_kl"].append(moved)
                    if moved >= shape.max_kl:  # at 0 room: before the first step
                        totals["ppo/stopped_early"].append(1.0)
                        break
                pg_loss, clipfrac, approx_kl = policy_loss(
                    logprobs, rollouts.logprobs[rows], advantages[rows], mask, shape.cliprange
                )
                loss = pg_loss
                if c.kl_penalty == "loss" and shape.kl_coef:
                    kl_tokens = kl_k3_weighted_tokens(
                        logprobs, rollouts.logprobs[rows], rollouts.ref_logprobs[rows], c.kl_max_weight
                    )
                    kl_loss = masked_mean(kl_tokens, mask)
                    loss = loss + shape.kl_coef * kl_loss
                    totals["ppo/loss/kl"].append(kl_loss.item())
                if values is not None:
                    v_loss, vf_clipfrac = value_loss(
                        values, rollouts.values[rows], returns[rows], mask, c.cliprange_value
                    )
                    loss = loss + c.vf_coef * v_loss
                    totals["ppo/loss/value"].append(v_loss.item())
                    totals["ppo/val/clipfrac"].append(vf_clipfrac.item())
                self.optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
                self.optimizer.step()
                self.at_reference = False
                for name, value in (
                    ("ppo/loss/policy", pg_loss), ("ppo/policy/approx_kl", approx_kl),
                    ("ppo/policy/clipfrac", clipfrac),
                ):
                    totals[name].append(value.item())
            if "ppo/stopped_early" in totals:  # no further pass either
                break
        stats = {name: sum(values) / len(values) for name, values in totals.items()}
        if "ppo/step_kl" in totals:  # how far the pass went: the last measure, not the mean
            stats["ppo/step_kl"] = totals["ppo/step_kl"][-1]
        return stats | {"ppo/steps": float(len(totals["ppo/loss/policy"]))}

    def save_adapter(self, out_dir: Path) -> Path:
        return save_adapter(self.policy, out_dir)


def sample_distance(rollouts: Rollouts, rows: torch.Tensor | slice = slice(None)) -> float:
    """KL(pi_old || pi_ref) in nats per answer (k1) over rows that pi_old sampled itself: the gate's measure."""
    return kl_k1(rollouts.logprobs[rows], rollouts.ref_logprobs[rows], rollouts.batch.response_mask[rows]).mean().item()


def own_distance(rollouts: Rollouts, on_policy: list[bool]) -> float | None:
    """sample_distance over the rows pi_old sampled itself; None if there are none: on another policy's samples the
    same sum estimates something else (minus KL(q || pi_ref) when q is the reference)."""
    own = torch.tensor(on_policy, device=rollouts.logprobs.device)
    return sample_distance(rollouts, own) if own.any() else None


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over answer tokens: 1 is a perfect critic, <= 0 a useless one."""
    return (1 - masked_var(returns - values, mask) / masked_var(returns, mask)).item()
