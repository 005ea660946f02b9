"""What several rlhf tests share: prompts, a fast reward-model config, a saved reward model, a small PPO config and
served answers to it, and logprobs computed independently of the code under test."""

from pathlib import Path

import torch

from rlhf.config import LoraSettings, PPOConfig, RewardConfig
from rlhf.data import Served
from rlhf.modeling import TokenBatch, forward, load_base, token_logprobs
from rlhf.reward import RewardHead, RewardModel

PPO_TOPICS = ("cats", "dogs", "rain", "the sea", "music", "bread", "trains", "stars", "tea", "snow", "chess", "bees")
PROMPTS = [[{"role": "user", "content": f"Tell me about {topic}."}] for topic in PPO_TOPICS]
# Both hidden states of the tiny 2-layer model past the embeddings, short answers, exact fp32: fast and comparable.
FAST = RewardConfig(layers=(0.5, 1.0), max_answer_tokens=16, precision="fp32", ensemble=2, bootstrap=200)


@torch.no_grad()
def answer_logprobs(model: torch.nn.Module, batch: TokenBatch, temperature: float) -> torch.Tensor:
    """Logprobs of the batch's answer tokens from full logits, sliced independently of ppo.py. (B, R)"""
    r, p = batch.response_mask.shape[1], batch.prompt_len
    logits = forward(model, batch).logits[:, p - 1 : p - 1 + r].float() / temperature
    return token_logprobs(logits, batch.responses) * batch.response_mask


def make_reward_model(model_dir: Path, out: Path, seed: int = 7, metadata: dict | None = None) -> Path:
    """A saved reward model with a random head on FAST's features of the tiny model (2 layers x 64 dims)."""
    generator = torch.Generator().manual_seed(seed)
    dims = 2 * 64
    head = RewardHead(torch.zeros(dims), torch.ones(dims), torch.randn(2, dims, generator=generator), torch.zeros(2))
    model = RewardModel(head, FAST, str(load_base(model_dir)[0].name_or_path))
    model.calibrate(torch.tensor([-1.0, 0.5, 2.0]))
    return model.save(out, metadata)


def six_comparisons() -> list[Served]:
    """12 served answers to 6 conversations: answer i is to prompt i % 6, the first six voted up, the rest down."""
    return [Served(p, f"answer {i}", ended=True, vote=1.0 - 2 * (i >= 6)) for i, p in enumerate(PROMPTS[:6] * 2)]


def tiny_config(**overrides) -> PPOConfig:
    settings = dict(
        batch_size=16, minibatch_size=8, epochs=4, lr=3e-3, max_new_tokens=8, temperature=0.1, kl_coef=0.05,
        missing_eos_penalty=None, lora=LoraSettings(r=8, alpha=16), precision="fp32",  # exact comparisons
    )
    return PPOConfig(**settings | overrides)
