"""Every training knob and its default: plain dataclasses, no torch, so the service's settings can read them.

These defaults are what production runs. `Settings` (service/settings.py) takes its CHATLOOP_<SECTION>_<FIELD>
defaults from here, and workers/config.py builds a PipelineConfig from the settings by the same names, so a
test, a benchmark and a deployment that set nothing all train the same way.
"""

from dataclasses import dataclass, field
from typing import Literal

# Forward passes under bf16 autocast over fp32 master weights ("bf16"), or plain fp32; "auto": bf16 where the device
# runs it natively (common/precision.py), else fp32
Precision = Literal["auto", "bf16", "fp32"]
Algorithm = Literal["ppo", "dpo", "kto"]
KLPenalty = Literal["reward", "loss"]
ServedStep = Literal["clipped", "contrast"]
RewardPooling = Literal["mean", "last", "mean+last"]
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    """The shape of a fresh adapter (policy or reward model); a loaded adapter keeps its own."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS


@dataclass
class RewardConfig:
    """A head on the frozen base's pooled hidden states (rlhf/features.py, rlhf/reward.py)."""

    # Hidden states read, as fractions of the model's depth (0: the embeddings, 1: the last layer), so that the
    # same setting fits any base: 0.5 and 0.8 are layers 15 and 24 of SmolLM2-135M's 30.
    layers: tuple[float, ...] = (0.5, 0.8)
    pooling: RewardPooling = "mean"  # over the answer's tokens, per layer
    l2: float = 0.3  # weight decay of the head, on standardised features (bench/RESULTS.md, the reward curve)
    ensemble: int = 4  # heads, each on a bootstrap resample of the votes (the first on all of them); scores average
    thumb_weight: float = 0.5  # a thumb says less than a comparison: it has no reference answer
    max_steps: int = 200  # L-BFGS iterations per head
    max_prompt_tokens: int = 512  # a longer conversation keeps its end, which the answer replies to
    max_answer_tokens: int = 256
    score_batch_size: int = 16  # rows per forward pass of the base
    bootstrap: int = 1000  # resamples for the held-out accuracy's 95 % interval
    seed: int = 0
    precision: Precision = "auto"  # the base's forward (bf16: under autocast); the head is fp32

    @classmethod
    def from_dict(cls, d: dict) -> "RewardConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "layers": tuple(known.get("layers", cls.layers))})


@dataclass
class PPOConfig:
    # Iterations per training run: the first on served answers (served_batch) when there are any, the rest on
    # fresh samples scored by the reward model
    iterations: int = 5
    batch_size: int = 16  # answers per rollout batch
    # Answers per prompt in a batch; > 1 baselines each score on its siblings' mean (RLOO), so the prompt's own
    # effect cancels. 1: one answer per prompt.
    group_size: int = 4
    minibatch_size: int = 8
    # A group's answers (one prompt's, or one conversation's served answers) share a minibatch: an answer's
    # gradient step sees the siblings it is baselined on (ppo_math.minibatches). False: rows shuffled freely.
    minibatch_groups: bool = False
    epochs: int = 2  # passes over each rollout batch
    # Against the preference itself, 1e-4, 3e-4 and 1e-3 moved held-out VADER by +0.115, +0.124 and +0.141 (each
    # about ±0.06) for 0.2, 3.4 and 10.7 nats (bench/RESULTS.md, PPO against the preference itself). In the
    # learning benchmark candidates at 1e-4 spent 0.3-0.5 nats and their users could not tell them from the base
    # (blind win rates 0.511 and 0.468); at 3e-4 on served answers alone they spent 0.25 nats (0.494, 0.462); at
    # 1e-3, 3.6 and 4.9 nats, and the second was the first candidate its users leaned toward (0.573 of 164 votes).
    lr: float = 1e-3
    # Nats per answer to the reference on the policy's own samples (the gate's measure, GateConfig.max_kl): a fresh
    # batch that measures more is not trained on and the run stops there (0: never). The served iteration with
    # served_step "contrast" stops at the same distance from its starting policy, measured on the served answers it
    # has not yet trained on (rlhf.ppo.step_shape), or sooner where the gate's budget (GateConfig.max_kl) less the
    # starting policy's own distance to the reference leaves less room. Fresh iterations spent 7.2 and
    # 9.1 nats in two learning-benchmark runs (bench/RESULTS.md) and 18.7 in one at lr 2e-3, the gate refusing it.
    max_kl: float = 6.0
    max_new_tokens: int = 64
    max_prompt_tokens: int = 512  # a longer conversation keeps its end (as the reward model reads it)
    temperature: float = 0.7  # sampling temperature; training logprobs use logits / the same value
    # False: no value head; each token's advantage is its reward-to-go (the group-baselined score plus the KL
    # penalties after it), REINFORCE/RLOO style under the same clipped objective. A fresh critic's noise swamped
    # the signal of 8 iterations (bench/RESULTS.md, "PPO against the preference itself").
    critic: bool = False
    gamma: float = 1.0
    lam: float = 0.95  # GAE lambda (with the critic)
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: float = 1.0
    kl_coef: float = 0.05  # the starting coefficient when adaptive_kl
    # "reward": -kl_coef * (logp - logp_ref) on every token's reward (Ziegler et al.); "loss": the reward is the
    # score alone and kl_coef * (the token mean of k3, weighted by pi / pi_old: ppo_math.kl_k3_weighted_tokens)
    # joins the loss (GRPO): each token's log-ratio is noise
    # that the reward-to-go sums over the rest of the answer, and without a critic nothing averages it out
    kl_penalty: KLPenalty = "loss"
    # With kl_penalty "loss": the importance weight pi / pi_old of each token's KL term is truncated here
    # (ppo_math.kl_k3_weighted_tokens; inf: exact). In one served iteration of the learning benchmark the KL term's
    # mean was 147 a token (bench/RESULTS.md), where a token at the clip's edge adds 0.019 (1 - r + r log r at
    # r = 1.2): a few tokens weighted in the thousands, whose gradient is then all of the norm-clipped step.
    kl_max_weight: float = float("inf")
    adaptive_kl: bool = False
    target_kl: float = 6.0  # nats per answer (lm-human-preferences)
    kl_horizon: int = 10000  # in answers
    # Score of an answer cut off at max_new_tokens; None keeps the reward model's. Off: most SmolLM2 answers run
    # past 64 tokens, so a penalty would teach brevity.
    missing_eos_penalty: float | None = None
    whiten_rewards: bool = False
    # Answers the starting (production) policy served to users at this temperature make the first iteration's
    # batch, up to this many (0: fresh samples only), rewarded by their users' votes: exact on-policy samples that
    # cost no generation, judged by the preference itself rather than by the reward model. When it served fewer
    # (just promoted), other versions' answers fill the batch (rlhf.data.FeedbackData.served). In the learning
    # benchmark (bench/RESULTS.md) a served answer cost about 2 s of training and a fresh one about 3.2 s, and the
    # reward model ordered held-out pairs at 0.61-0.68 where a vote is the user's own verdict: so most of a run goes
    # to served answers.
    served_batch: int = 256
    # Thumbed answers join the served batch too (else only both answers of each comparison). On the same 150 votes of
    # simulated users (bench/RESULTS.md, "PPO's served iteration against DPO on the same votes") the served
    # iteration gained +0.084 ± 0.019 at 1.3 nats on comparisons alone and +0.009 ± 0.021 at 1.8 with thumbs: a
    # thumb says whether an answer is good in itself, which its prompt mostly decides, and has no sibling to be
    # baselined on; a comparison says which of two answers to one prompt is better. Those are single training runs:
    # over five training seeds on other votes the comparisons-only step ranged from -0.021 to +0.036 (bench/RESULTS.md,
    # "PPO's served step against DPO over training seeds").
    served_thumbs: bool = False
    # How the served iteration steps (rlhf.ppo.step_shape). "contrast": minibatch_size comparisons a step (a
    # conversation's answers together), one pass, no clip and no KL term, stopping before a minibatch of served
    # answers that measures more than max_kl nats from the starting policy: each step raises the answers voted up
    # and lowers the others, as DPO's steps do, and the KL budget bounds how far. "clipped": as a fresh iteration
    # steps (minibatch_size answers, epochs passes, the clip and the KL term), which gained +0.017 in three seeds of
    # the learning benchmark, its users unable to tell most candidates from the base; "contrast" gained +0.133
    # (+0.000 rerun on a machine half as fast), +0.000 and +0.223 in three, and +0.785 for `concise` users against
    # the clipped step's +0.224 (bench/RESULTS.md, "PPO's served step as a contrast" and the sections above it).
    served_step: ServedStep = "contrast"
    # Fresh samples are scored by the reward model, so they are worth their cost only when it orders held-out pairs
    # better than chance: with served answers to train on, a run whose reward model's held-out pair accuracy has a
    # 95 % lower bound at or below this trains on those answers alone (0: always sample fresh too).
    min_reward_accuracy: float = 0.5
    # A run that ends further from the reference than the gate's budget (GateConfig.max_kl) less one standard error,
    # measured as the gate measures it (one fresh answer of its own to each of the gate's EvalConfig.prompts prompts),
    # is pulled back along its own step (start + f * (end - start), f from ppo_math.budget_scale, aiming inside the
    # budget) and measured again, up to this many times; still over, it ends where it started. One contrast step from a
    # policy 10.5 nats out went 15 nats further and the gate refused the candidate (bench/RESULTS.md). 0: never (the
    # gate refuses what ends past it).
    budget_trials: int = 3
    seed: int = 0
    precision: Precision = "auto"
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if self.batch_size % self.group_size:
            raise ValueError(f"the PPO batch size ({self.batch_size}) must be a multiple of the group size "
                             f"({self.group_size})")


@dataclass
class OfflineConfig:
    algorithm: Literal["dpo", "kto"] = "dpo"
    beta: float = 0.1  # the DPO and KTO papers' default
    # Full fine-tunes run DPO at 5e-7..1e-6 (DPO paper, Zephyr) and LoRA wants ~10x a full fine-tune's rate
    # (TRL's PEFT guide; "LoRA Without Regret"). A round here is only tens of steps from the production adapter,
    # and the loop benchmark's sweep (bench/RESULTS.md) found 1e-3 the largest rate that stays inside the gate's
    # KL budget; beta keeps the policy near the base and the gate checks the rest.
    lr: float = 1e-3
    epochs: float = 1
    batch_size: int = 8  # pairs (DPO) or labelled answers (KTO: must be > 1, its KL estimate uses the batch)
    grad_accum: int = 1
    warmup: float = 0.1  # fraction of the steps: linear warmup, then linear decay
    # TRL 1.16 has a single max_length (= these two added) and keeps the start: an answer past it loses its
    # end, and an example whose prompt alone fills it is dropped.
    max_prompt_tokens: int = 512
    max_answer_tokens: int = 256
    # Newest records of the training window DPO/KTO train on: unlike the reward model's head they back-propagate
    # through the LM for every record, about 2 s a pair on 2 cores.
    window: int = 150
    seed: int = 0
    # bench/RESULTS.md, "Training": where bf16 is native, bf16 DPO is ~2x fp32 per pair on 2 cores
    precision: Precision = "auto"
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if self.algorithm not in ("dpo", "kto"):
            raise ValueError(f"unknown offline algorithm {self.algorithm!r}: expected 'dpo' or 'kto'")


@dataclass
class EvalConfig:
    prompts: int = 32  # held-out prompts the gate evaluates on (training prompts fill up when there are fewer)
    temperature: float = 0.7
    max_new_tokens: int = 64
    max_prompt_tokens: int = 512
    batch_size: int = 16
    seed: int = 0
    precision: Precision = "auto"


@dataclass
class GateConfig:
    # The candidate's mean reward-model score (in production-answer std units) must beat production's by more.
    # Slightly negative: a reward model from a few hundred noisy votes is close to chance on 32 answers, so the
    # gate leans on its KL, length and EOS checks until it has more data.
    min_score_gain: float = -0.25
    max_kl: float = 12.0  # nats per answer to the reference policy
    min_length_ratio: float = 0.5  # candidate mean length / current mean length
    max_eos_drop: float = 0.2  # candidate EOS fraction may fall at most this far below the current one
    min_win_rate: float = 0.0  # fraction of prompts where the reward model prefers the candidate's answer


@dataclass
class PipelineConfig:
    algorithm: Algorithm = "ppo"  # how train_policy updates the policy
    device: str = "cpu"  # where every stage trains and scores: "cpu", "cuda", "cuda:1" ...
    # Newest feedback records a run trains on (0: all): the reward model learns from all of them (its features are
    # cached, so a large window costs little) and PPO draws its prompts from them; bounded, so a run's cost is too.
    train_window: int = 10_000
    heldout_fraction: float = 0.2  # of the conversations: the reward model's test side (~200 pairs per 2,000 votes)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)  # DPO / KTO (offline.algorithm follows algorithm)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gate: GateConfig = field(default_factory=GateConfig)
