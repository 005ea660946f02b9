"""The maths of PPO for language models, as pure functions on tensors.

Shapes: B answers in a batch, R answer-token columns (answers right-padded); `mask` is (B, R) with 1 on
real answer tokens. Follows OpenAI's lm-human-preferences and "The N Implementation Details of RLHF
with PPO" (Huang et al.): per-token KL penalty plus the score at the last token, GAE, whitened
advantages, clipped surrogate and clipped value loss, adaptive KL coefficient.
"""

import math

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum()


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked entries (Bessel-corrected by default, as TRL and lm-human-preferences)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        variance = variance * count / (count - 1)
    return variance


def leave_one_out(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each score minus the mean of the other answers to the same prompt (RLOO's baseline, Ahmadian et al.
    2024). scores (B,) hold consecutive groups of group_size answers to one prompt; group_size 1: unchanged.

    What the prompt alone decides (an egg recipe is less warm than a birthday note) cancels out; what is
    left is how this answer compares with its siblings: far less variance for a few hundred samples."""
    if group_size == 1:
        return scores
    if group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    groups = scores.view(-1, group_size)
    others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).view(-1)


def leave_one_out_groups(scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """leave_one_out for groups of any size, given as a group id per answer (B,): each score minus the mean of the
    other answers in its group; an answer alone in its group is baselined on the mean of every other answer."""
    ids = torch.unique(groups, return_inverse=True)[1]  # (B,) in 0..G-1
    sums = torch.zeros(int(ids.max()) + 1, dtype=scores.dtype, device=scores.device).index_add_(0, ids, scores)
    counts = torch.bincount(ids).to(scores.dtype)  # (G,)
    others = counts[ids] - 1  # (B,)
    in_group = (sums[ids] - scores) / others.clamp(min=1)
    everyone = (scores.sum() - scores) / max(scores.numel() - 1, 1)
    return scores - torch.where(others > 0, in_group, everyone)


def minibatches(n: int, size: int, groups: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Row indices of n answers in shuffled minibatches of about `size` (global RNG). With groups (a group id per
    answer) a group's answers share a minibatch: whole groups in shuffled order, as many as fit in `size` (a group
    larger than `size` is a minibatch of its own). Each step then sees an answer beside the siblings it is
    baselined on, so what their gradients share (the prompt, the opening words) cancels within the step rather
    than across steps."""
    if groups is None:
        return list(torch.randperm(n).split(size))
    ids = torch.unique(groups.cpu(), return_inverse=True)[1].tolist()
    members: list[list[int]] = [[] for _ in range(max(ids) + 1)]
    for row, g in enumerate(ids):
        members[g].append(row)
    out, current = [], []
    for group in torch.randperm(len(members)).tolist():
        if current and len(current) + len(members[group]) > size:
            out.append(torch.tensor(current))
            current = []
        current += members[group]
    if current:
        out.append(torch.tensor(current))
    return out


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Scale to unit variance over the masked entries; also centre on 0 unless shift_mean is False.

    Rewards are whitened without the shift (the mean reward carries the signal); advantages with it.
    Padded entries come back as 0.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def compute_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * (logp - logp_ref) on every answer token, plus the score on the last.

    scores (B,), logprobs/ref_logprobs/mask (B, R) -> rewards (B, R), kl (B, R). The "last token" is
    the last unmasked one, whether it is EOS or a truncated answer's final token (a truncated answer's
    score should already have been replaced by a penalty, see PPOConfig.missing_eos_penalty).
    """
    mask = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # (B,)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's answer tokens -> (advantages, returns), (B, R).

    delta_t = r_t + gamma * V_{t+1} - V_t; A_t = delta_t + gamma * lam * A_{t+1}; the value past the
    last answer token is 0 (the episode ends there). Padded positions get 0 advantage and 0 return.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    last_gae = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_values = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    cliprange: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate -> (pg_loss, clipfrac, approx_kl), all scalars, means over answer tokens.

    approx_kl is lm-human-preferences' 0.5 * mean((logp - logp_old)^2) between the new and old policy.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)
    clipfrac = masked_mean((pg_losses_clipped > pg_losses).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio.detach() ** 2, mask)
    return pg_loss, clipfrac, approx_kl


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
    cliprange_value: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * mean(max((V - G)^2, (V_clipped - G)^2)) -> (v_loss, vf_clipfrac)."""
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_losses = (values - returns) ** 2
    vf_losses_clipped = (values_clipped - returns) ** 2
    v_loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), mask)
    vf_clipfrac = masked_mean((vf_losses_clipped > vf_losses).float(), mask)
    return v_loss, vf_clipfrac


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim: logsumexp(z) - sum(p * z). (..., V) -> (...)"""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(policy || ref) per answer, summed over tokens: sum(logp - logp_ref). (B, R) -> (B,)"""
    return ((logprobs - ref_logprobs) * mask).sum(-1)


def kl_k3_tokens(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 per token: (r - 1) - log r, r = p_ref / p; unbiased, never negative. (B, R)"""
    log_r = ref_logprobs - logprobs
    return torch.exp(log_r) - 1 - log_r


def kl_k3_weighted_tokens(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, max_weight: float = math.inf
) -> torch.Tensor:
    """k3 per token importance-weighted from the policy that sampled the tokens (old_logprobs), as a loss. (B, R)

    (pi / pi_old) * k3 = pi_ref / pi_old - pi / pi_old - (pi / pi_old) * log(pi_ref / pi), written so that nothing
    divides by pi. Under pi_old's samples its expectation is KL(pi || pi_ref) and its gradient with respect to
    log pi is (pi / pi_old) * (log pi - log pi_ref), the reverse KL's own. Plain k3 is right only on pi's own
    samples: on a token pi has learnt to avoid (a served answer its users voted down) its pi_ref / pi grows like
    e^r and its gradient, 1 - pi_ref / pi, with it; weighted, that token's term tends to pi_ref / pi_old and its
    gradient to 0. On a fresh sample's first step pi = pi_old and the two agree in value.

    The weight has the opposite flaw on a token pi has come to favour far beyond pi_old (a rare token of an
    answer voted up, raised by the steps on other answers while the clip held its own term): pi / pi_old of e^9
    makes one token's gradient, (pi / pi_old) log(pi / pi_ref), thousands of times a whole minibatch's policy
    gradient, and the norm clip then spends the step on it. max_weight truncates the weight (IMPALA's rho-bar):
    where pi / pi_old > max_weight the term is scaled by max_weight / (pi / pi_old) as a constant, so its gradient
    is max_weight * (log pi - log pi_ref). math.inf: the exact weight."""
    ratio = torch.exp(logprobs - old_logprobs)
    term = torch.exp(ref_logprobs - old_logprobs) - ratio - ratio * (ref_logprobs - logprobs)
    if math.isinf(max_weight):
        return term
    return term * (max_weight / ratio).clamp(max=1.0).detach()


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 per answer, summed over its tokens. (B, R) -> (B,)"""
    return (kl_k3_tokens(logprobs, ref_logprobs) * mask).sum(-1)


class FixedKLController:
    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """lm-human-preferences' controller: move beta by the clipped proportional error, n_steps/horizon at a time.

    current_kl is the mean KL per answer (nats); n_steps is how many answers the batch had.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon


def budget_scale(start_kl: float, measures: list[tuple[float, float]], target_kl: float) -> float:
    """The fraction f of a step (parameters start + f * (end - start)) expected to end target_kl nats from the
    reference, from the start's distance and the (f, nats) measured so far along it, the last the latest. The model is
    start_kl + c * f**p: c through the last measure; p through the last two (clamped to [1, 4]: a KL grows with
    the square of a small step and more slowly once the policy saturates), or 2 with one measure. The last measure's
    own f when it is within target_kl; 0 when start_kl is not."""
    f, kl = measures[-1]
    if kl <= target_kl:
        return f
    if start_kl >= target_kl:
        return 0.0
    power = 2.0
    if len(measures) > 1:
        f0, kl0 = measures[-2]
        if kl0 > start_kl and f0 != f:
            power = min(4.0, max(1.0, math.log((kl0 - start_kl) / (kl - start_kl)) / math.log(f0 / f)))
    return f * ((target_kl - start_kl) / (kl - start_kl)) ** (1 / power)
