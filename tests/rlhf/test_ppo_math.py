"""PPO maths against values worked out by hand (the working is in the comments)."""

import itertools
import math

import pytest
import torch

from rlhf.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    budget_scale,
    compute_rewards,
    entropy_from_logits,
    gae,
    kl_k1,
    kl_k3,
    kl_k3_tokens,
    kl_k3_weighted_tokens,
    leave_one_out,
    leave_one_out_groups,
    masked_mean,
    masked_var,
    minibatches,
    policy_loss,
    value_loss,
    whiten,
)


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=1e-5, rtol=1e-5)


def test_masked_mean_and_var():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # kept: 1, 2, 4 -> mean 7/3
    close(masked_mean(values, mask), 7 / 3)
    # deviations -4/3, -1/3, 5/3 -> squares 16/9 + 1/9 + 25/9 = 42/9; biased 42/27 = 14/9, unbiased 42/18 = 7/3
    close(masked_var(values, mask), 7 / 3)
    close(masked_var(values, mask, unbiased=False), 14 / 9)


def test_whiten():
    values = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 0]])
    # kept 1, 3: mean 2, unbiased var (1 + 1) / 1 = 2 -> (x - 2) / sqrt(2) = -0.70711, +0.70711; pad -> 0
    close(whiten(values, mask), [[-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]])
    # without the shift the mean 2 is added back: 1.29289, 2.70711
    close(whiten(values, mask, shift_mean=False), [[2 - 1 / math.sqrt(2), 2 + 1 / math.sqrt(2), 0.0]])


def test_compute_rewards_with_and_without_eos():
    scores = torch.tensor([2.0, -1.0])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, -0.5]])
    # row 0 ended with EOS at column 1; row 1 hit the token limit (no EOS): its last token is column 2
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards, kl = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    # kl = logp - ref on answer tokens: row 0 [0.5, 0, (pad) 0]; row 1 [1, 0, -0.5]
    close(kl, [[0.5, 0.0, 0.0], [1.0, 0.0, -0.5]])
    # rewards = -0.1 * kl, score on the last answer token:
    # row 0 [-0.05, 0 + 2, 0]; row 1 [-0.1, 0, 0.05 - 1 = -0.95]
    close(rewards, [[-0.05, 2.0, 0.0], [-0.1, 0.0, -0.95]])


def test_gae_full_row():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    mask = torch.ones(1, 3)
    # gamma 1, lam 0.5; value past the end is 0
    # t=2: delta = 2 + 0 - 1.5 = 0.5,   A2 = 0.5
    # t=1: delta = 0 + 1.5 - 1 = 0.5,   A1 = 0.5 + 0.5 * 0.5 = 0.75
    # t=0: delta = 1 + 1 - 0.5 = 1.5,   A0 = 1.5 + 0.5 * 0.75 = 1.875
    # returns = A + V = [2.375, 1.75, 2.0]
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    close(advantages, [[1.875, 0.75, 0.5]])
    close(returns, [[2.375, 1.75, 2.0]])
    # gamma 0.5, lam 1:
    # t=2: delta = 2 - 1.5 = 0.5,              A2 = 0.5
    # t=1: delta = 0 + 0.5 * 1.5 - 1 = -0.25,  A1 = -0.25 + 0.5 * 0.5 = 0
    # t=0: delta = 1 + 0.5 * 1 - 0.5 = 1,      A0 = 1 + 0.5 * 0 = 1
    advantages, returns = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    close(advantages, [[1.0, 0.0, 0.5]])
    close(returns, [[1.5, 1.0, 2.0]])


def test_gae_without_a_critic_is_the_reward_to_go():
    """What PPO without a critic uses: values 0, gamma 1, lambda 1 -> A_t = r_t + r_{t+1} + ... (pads excluded)."""
    rewards = torch.tensor([[-0.1, -0.2, 0.9, 5.0], [0.3, -0.1, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    advantages, returns = gae(rewards, torch.zeros(2, 4), mask, gamma=1.0, lam=1.0)
    close(advantages, [[0.6, 0.7, 0.9, 0.0], [0.2, -0.1, 0.0, 0.0]])
    close(returns, advantages)


def test_gae_ignores_padding():
    rewards = torch.tensor([[1.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 7.0]])
    mask = torch.tensor([[1, 1, 0]])
    # the answer ends at t=1, so the pad's reward 99 and value 7 must not leak in (gamma 1, lam 0.5):
    # t=1: delta = 2 + 0 - 1 = 1,       A1 = 1
    # t=0: delta = 1 + 1 - 0.5 = 1.5,   A0 = 1.5 + 0.5 * 1 = 2
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    close(advantages, [[2.0, 1.0, 0.0]])
    close(returns, [[2.5, 2.0, 0.0]])


def test_policy_loss():
    old_logprobs = torch.full((2, 3), -1.0)
    ratios = torch.tensor([[1.0, 1.5, 0.5], [0.5, 3.0, 3.0]])
    logprobs = old_logprobs + ratios.log()
    advantages = torch.tensor([[2.0, 1.0, -1.0], [1.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # per token max(-A * ratio, -A * clip(ratio, 0.8, 1.2)):
    #   ratio 1.0, A 2:   max(-2, -2)      = -2
    #   ratio 1.5, A 1:   max(-1.5, -1.2)  = -1.2  (clipped)
    #   ratio 0.5, A -1:  max(0.5, 0.8)    = 0.8   (clipped)
    #   ratio 0.5, A 1:   max(-0.5, -0.8)  = -0.5
    # pg_loss = (-2 - 1.2 + 0.8 - 0.5) / 4 = -0.725; clipfrac = 2 / 4
    # approx_kl = 0.5 * (0 + ln(1.5)^2 + ln(0.5)^2 + ln(0.5)^2) / 4 = 0.5 * (0.164402 + 2 * 0.480453) / 4 = 0.140664
    pg_loss, clipfrac, approx_kl = policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    close(pg_loss, -0.725)
    close(clipfrac, 0.5)
    close(approx_kl, 0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4)
    close(approx_kl, 0.140664)


def test_policy_loss_gradient_vanishes_when_clipped():
    logprobs = torch.tensor([[math.log(1.5)]], requires_grad=True)
    pg_loss, _, _ = policy_loss(logprobs, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1))
    pg_loss.backward()
    # ratio 1.5 > 1.2 with a positive advantage: the clipped branch wins and is constant in logprobs
    close(logprobs.grad, [[0.0]])


def test_value_loss():
    values = torch.tensor([[1.5, 1.5, 2.0]])
    old_values = torch.ones(1, 3)
    returns = torch.tensor([[2.0, 0.0, 1.0]])
    mask = torch.tensor([[1, 1, 0]])
    # clipped values: 1 + clip(0.5, -0.2, 0.2) = 1.2
    # token 0: (1.5 - 2)^2 = 0.25, (1.2 - 2)^2 = 0.64 -> 0.64 (clipped)
    # token 1: (1.5 - 0)^2 = 2.25, (1.2 - 0)^2 = 1.44 -> 2.25
    # v_loss = 0.5 * (0.64 + 2.25) / 2 = 0.7225; vf_clipfrac = 1 / 2
    v_loss, vf_clipfrac = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    close(v_loss, 0.7225)
    close(vf_clipfrac, 0.5)


def test_entropy_from_logits():
    # uniform over 2: ln 2 = 0.693147; p = (0.75, 0.25): 0.75 * ln(4/3) + 0.25 * ln 4 = 0.215762 + 0.346574
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    close(entropy_from_logits(logits), [math.log(2.0), 0.562335])


def test_kl_estimators_per_answer():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # k1 = sum(logp - ref): row 0 0.5 + 0 = 0.5; row 1 1 + 0 - 0.5 = 0.5
    close(kl_k1(logprobs, ref_logprobs, mask), [0.5, 0.5])
    # k3 = sum(e^x - 1 - x), x = ref - logp: row 0 x = -0.5, 0 -> 0.606531 - 0.5 = 0.106531
    # row 1 x = -1, 0, 0.5 -> (0.367879 - 1 + 1) + 0 + (1.648721 - 1 - 0.5) = 0.367879 + 0.148721 = 0.516600
    close(kl_k3(logprobs, ref_logprobs, mask), [0.106531, 0.516600])
    # per token, before the mask: the same terms, and the row-0 pad (x = 1 -> e - 2 = 0.718282) is kept
    close(kl_k3_tokens(logprobs, ref_logprobs), [[0.106531, 0.0, 0.718282], [0.367879, 0.0, 0.148721]])


def test_weighted_k3_by_hand():
    # pi = 1/2, pi_old = 1/4, pi_ref = 1/8: weight pi / pi_old = 2, k3 = 1/4 - 1 - log(1/4) = 0.636294,
    # weighted 1.272589 = pi_ref/pi_old - pi/pi_old - 2 * log(pi_ref/pi) = 0.5 - 2 + 2 * log 4
    logprobs = torch.tensor([[math.log(0.5)]], requires_grad=True)
    old, ref = torch.tensor([[math.log(0.25)]]), torch.tensor([[math.log(0.125)]])
    term = kl_k3_weighted_tokens(logprobs, old, ref)
    close(term, [[1.272589]])
    term.sum().backward()
    # d/d log pi = (pi / pi_old) * (log pi - log pi_ref) = 2 * log 4
    close(logprobs.grad, [[2.772589]])


def test_weighted_k3_truncates_the_weight_of_a_token_the_policy_has_come_to_favour():
    """pi / pi_old = e^3 on a token served by the reference itself (pi_old = pi_ref), max_weight 2. Exact: the term
    is 1 - e^3 + 3 e^3 = 41.171074 and its gradient e^3 * 3 = 60.256611. Truncated: both scaled by 2 / e^3, the
    term 4.099574 and its gradient 2 * 3 = 6."""
    old = torch.tensor([[math.log(0.01)]])
    logprobs = (old + 3.0).requires_grad_()
    exact = kl_k3_weighted_tokens(logprobs, old, old)
    close(exact, [[41.171074]])
    (grad,) = torch.autograd.grad(exact.sum(), logprobs)
    close(grad, [[60.256611]])
    term = kl_k3_weighted_tokens(logprobs, old, old, max_weight=2.0)
    close(term, [[4.099574]])
    term.sum().backward()
    close(logprobs.grad, [[6.0]])


def test_weighted_k3_is_exact_up_to_the_max_weight():
    """The hand-computed token above (weight 2) and one the policy avoids (weight 1/2) are untouched by a max of 2."""
    logprobs = torch.tensor([[math.log(0.5), math.log(0.1)]], requires_grad=True)
    old, ref = torch.tensor([[math.log(0.25), math.log(0.2)]]), torch.tensor([[math.log(0.125), math.log(0.3)]])
    exact = kl_k3_weighted_tokens(logprobs, old, ref)
    (exact_grad,) = torch.autograd.grad(exact.sum(), logprobs)
    term = kl_k3_weighted_tokens(logprobs, old, ref, max_weight=2.0)
    term.sum().backward()
    close(term, exact.tolist())
    close(logprobs.grad, exact_grad.tolist())


def test_weighted_k3_is_plain_k3_on_the_policys_own_samples():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, -0.5]])
    close(kl_k3_weighted_tokens(logprobs, logprobs, ref_logprobs), kl_k3_tokens(logprobs, ref_logprobs).tolist())


def test_weighted_k3_stays_bounded_on_a_token_the_policy_has_learnt_to_avoid():
    """A served answer voted down: pi_old = pi_ref = 1/2 when it was served, and training pushed pi to e^-30.
    Plain k3 is pi_ref/pi ~ 5e12 with a gradient as large; weighted, the term tends to pi_ref/pi_old = 1 and its
    gradient (pi/pi_old) * (log pi - log pi_ref) to 0, the KL's own."""
    logprobs = torch.tensor([[-30.0]], requires_grad=True)
    half = torch.tensor([[math.log(0.5)]])
    assert kl_k3_tokens(logprobs, half).item() > 1e12
    term = kl_k3_weighted_tokens(logprobs, half, half)
    term.sum().backward()
    close(term, [[1.0]])
    assert 0 > logprobs.grad.item() > -1e-11


def test_weighted_k3_averages_to_the_kl_over_the_behaviour_policys_samples():
    """E over x ~ pi_old of the weighted term = KL(pi || pi_ref), exactly, for any three distributions."""
    pi, pi_old, pi_ref = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.3, 0.5, 0.2])
    terms = kl_k3_weighted_tokens(pi.log(), pi_old.log(), pi_ref.log())
    close((pi_old * terms).sum(), (pi * (pi / pi_ref).log()).sum().item())


def test_fixed_kl_controller_never_moves():
    controller = FixedKLController(0.05)
    controller.update(100.0, 64)
    assert controller.value == 0.05


@pytest.mark.parametrize(
    ("current_kl", "expected"),
    [
        # over target: error 9/6 - 1 = 0.5, clipped to 0.2 -> beta * (1 + 0.2 * 1000 / 10000) = 0.1 * 1.02
        (9.0, 0.102),
        # under target: error 5.4/6 - 1 = -0.1 -> beta * (1 - 0.1 * 0.1) = 0.1 * 0.99
        (5.4, 0.099),
        # far under: error -1 clipped to -0.2 -> 0.1 * 0.98
        (0.0, 0.098),
        # on target: no change
        (6.0, 0.1),
    ],
)
def test_adaptive_kl_controller(current_kl, expected):
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    controller.update(current_kl, n_steps=1000)
    assert controller.value == pytest.approx(expected)


def test_leave_one_out_baselines_each_answer_on_its_siblings():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    close(leave_one_out(scores, 2), [1 - 2, 2 - 1, 3 - 6, 6 - 3])
    # groups of 4: 1 - (2+3+6)/3 = -8/3, 2 - 10/3 = -4/3, 3 - 9/3 = 0, 6 - 6/3 = 4
    close(leave_one_out(scores, 4), [-8 / 3, -4 / 3, 0.0, 4.0])
    close(leave_one_out(scores, 1), [1.0, 2.0, 3.0, 6.0])
    with pytest.raises(ValueError, match="groups of 3"):
        leave_one_out(scores, 3)


def test_leave_one_out_groups_by_hand():
    scores = torch.tensor([1.0, 3.0, 10.0, 2.0, 4.0, 6.0])
    groups = torch.tensor([7, 7, 9, 5, 5, 5])  # ids need not be consecutive or sorted
    expected = torch.tensor([
        1 - 3, 3 - 1,  # a pair: each against the other
        10 - (1 + 3 + 2 + 4 + 6) / 5,  # alone in its group: against everyone else
        2 - 5, 4 - 4, 6 - 3,  # a group of three: against the mean of the other two
    ])
    torch.testing.assert_close(leave_one_out_groups(scores, groups), expected)
    # Equal groups give what leave_one_out gives.
    same = torch.tensor([1.0, 2.0, 3.0, 5.0])
    torch.testing.assert_close(leave_one_out_groups(same, torch.tensor([0, 0, 1, 1])), leave_one_out(same, 2))


def test_minibatches_without_groups_split_a_permutation():
    torch.manual_seed(0)
    batches = minibatches(7, 3)
    assert [len(b) for b in batches] == [3, 3, 1]
    assert sorted(torch.cat(batches).tolist()) == list(range(7))


def test_minibatches_keep_each_group_whole_and_fill_up_to_the_size():
    # groups of 3, 2, 1, 5 (larger than the size: a minibatch of its own) and 1 answer, ids not in order
    groups = torch.tensor([7, 7, 7, 2, 2, 9, 4, 4, 4, 4, 4, 0])
    for seed in range(20):
        torch.manual_seed(seed)
        batches = minibatches(len(groups), 4, groups)
        rows = torch.cat(batches).tolist()
        assert sorted(rows) == list(range(len(groups)))  # every answer once
        where = {}
        for i, batch in enumerate(batches):
            for g in groups[batch].tolist():
                assert where.setdefault(g, i) == i  # no group split across minibatches
            assert len(batch) <= 4 or set(groups[batch].tolist()) == {4}
        # greedy packing in the shuffled order: no two neighbours would have fitted together
        sizes = [len(b) for b in batches]
        assert all(a + b > 4 for a, b in itertools.pairwise(sizes))


def test_minibatch_order_is_shuffled():
    groups = torch.arange(6).repeat_interleave(2)
    orders = set()
    for seed in range(5):
        torch.manual_seed(seed)
        orders.add(tuple(groups[torch.cat(minibatches(12, 4, groups))].tolist()))
    assert len(orders) > 1



@pytest.mark.parametrize("start, measures, target, scale", [
    (10.0, [(1.0, 26.0)], 12.0, math.sqrt(2 / 16)),  # 2 nats of room, a step that went 16 further: sqrt(1/8) of it
    (0.0, [(1.0, 16.0)], 4.0, 0.5),  # from the reference, KL grows with the square of the step: half the step
    # two measures: 16 at f 1 and 4 at f 1/2 say p = 2 (c = 16), so 1 nat is at f = 1/4
    (0.0, [(1.0, 16.0), (0.5, 4.0)], 1.0, 0.25),
    # 16 then 8: p = 1, so 2 nats is at f = 1/8; 16 then 15 would say p = 0.09, clamped to 1: f = 0.5 * 2 / 15
    (0.0, [(1.0, 16.0), (0.5, 8.0)], 2.0, 0.125),
    (0.0, [(1.0, 16.0), (0.5, 15.0)], 2.0, 0.5 * 2 / 15),
    # 17 then 2 (from a start 1 out): p = log(16) / log(2) = 4, so 1.5 nats is at 0.5 * (0.5 / 1) ** (1 / 4)
    (1.0, [(1.0, 17.0), (0.5, 2.0)], 1.5, 0.5 * 0.5 ** 0.25),
    (3.0, [(1.0, 9.0)], 9.0, 1.0),  # within the target: the whole step
    (3.0, [(1.0, 20.0), (0.4, 8.0)], 9.0, 0.4),  # or as much of it as was last measured within
    (12.5, [(1.0, 20.0)], 12.0, 0.0),  # the start is already past it: none
])
def test_budget_scale_is_the_step_fraction_where_the_fitted_kl_meets_the_target(start, measures, target, scale):
    assert budget_scale(start, measures, target) == pytest.approx(scale)
