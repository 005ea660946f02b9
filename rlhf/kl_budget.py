"""Where a PPO run may end: within the gate's KL budget (GateConfig.max_kl), measured as the gate measures it.

The contrast's stop (rlhf.ppo.step_shape) looks before each step, and one step can cross the whole budget: in the
learning benchmark one contrast step from a policy 10.5 nats out went 15 nats further and the gate refused the
candidate (bench/RESULTS.md). A run that ends past the budget is pulled back along its own step instead.
"""

from typing import TYPE_CHECKING

import torch

from common.conversations import Messages
from rlhf.config import EvalConfig
from rlhf.ppo_math import budget_scale, kl_k1

if TYPE_CHECKING:
    from rlhf.ppo import PPOTrainer

# A run's end is measured as the gate measures it: one fresh answer to each of as many distinct prompts as the gate
# evaluates on (EvalConfig.prompts; the pipeline passes the configured count). In bench/budget_fit.py one batch of 16
# measured 10.5 nats where 204 answers measured 12.5; and 32 answers in PPO's groups (8 prompts x 4) measured 9.5 +- 1.1
# where the gate's 32 prompts measured 12.9: a policy's KL differs between prompts, so answers to one prompt are not
# independent measures of it. Pulled back, a run aims at this share of the room its start left, or one standard error
# inside the budget if that is nearer, not at the budget's edge: the gate measures on other samples.
BUDGET_AIM = 0.9


def fit_budget(
    trainer: "PPOTrainer", start: list[torch.Tensor], start_at_reference: bool, history: list[dict[str, float]],
    prompt_pool: list[Messages], kl_limit: float, prompts: int,
) -> dict[str, float]:
    """The trainer's run (its history, from parameters start) measured on fresh samples of its own as the gate measures
    it (measure_distance, on `prompts` prompts), and unless that measure plus its standard error is within kl_limit of
    the reference, pulled back along its own step: parameters start + f * (end - start), f aimed at BUDGET_AIM of the
    room the start left or at one standard error inside kl_limit, whichever is nearer (ppo_math.budget_scale, from the
    start's distance and the measures so far), then measured again, up to config.budget_trials times; still over, the
    policy is the start again (f 0). The start's distance is the served iteration's start_kl, or the first fresh batch's
    own measure. Returns the last measure and its standard error (ppo/budget_kl, ppo/budget_kl_se: of the policy the run
    ends with, unless f is 0) and the answers it took (ppo/budget_answers), f and the measures taken after the first."""
    end = [p.detach().clone() for p in trainer.params]
    start_kl = 0.0 if start_at_reference else history[0].get("ppo/start_kl", history[0]["objective/kl"])
    measured, se = measure_distance(trainer, prompt_pool, prompts)
    measures = [(1.0, measured)]
    scale, trials = 1.0, 0
    while measured + se > kl_limit and scale > 0:
        target = min(start_kl + BUDGET_AIM * (kl_limit - start_kl), kl_limit - se)
        scale = budget_scale(start_kl, measures, target) if trials < trainer.config.budget_trials else 0.0
        with torch.no_grad():
            for p, a, b in zip(trainer.params, start, end, strict=True):
                p.copy_(a + scale * (b - a))
        trainer.at_reference = start_at_reference and scale == 0
        if scale > 0:
            (measured, se), trials = measure_distance(trainer, prompt_pool, prompts), trials + 1
            measures.append((scale, measured))
    return {"ppo/budget_kl": measured, "ppo/budget_kl_se": se, "ppo/budget_answers": float(prompts),
            "ppo/budget_scale": scale, "ppo/budget_trials": float(trials)}


def measure_distance(
    trainer: "PPOTrainer", prompt_pool: list[Messages], count: int = EvalConfig.prompts,
) -> tuple[float, float]:
    """The policy's KL to the reference, nats per answer, on one fresh answer of its own to each of `count` prompts
    drawn from the pool without repeats (the gate's measure; a smaller pool is used whole, then again in
    another order): the mean and its standard error, batch_size answers a pass."""
    prompts: list[Messages] = []
    while len(prompts) < count:
        prompts += trainer.rng.sample(prompt_pool, min(len(prompt_pool), count - len(prompts)))
    kls = []
    for first in range(0, len(prompts), trainer.config.batch_size):
        rollouts = trainer.sample(prompts[first : first + trainer.config.batch_size])
        kls.append(kl_k1(rollouts.logprobs, rollouts.ref_logprobs, rollouts.batch.response_mask))
    kl = torch.cat(kls)
    return kl.mean().item(), (kl.std() / len(kl) ** 0.5).item()
