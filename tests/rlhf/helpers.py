"""What several rlhf tests share: prompts, a fast reward-model config, a saved reward model, and logprobs
computed independently of the code under test."""

from pathlib import Path

import torch

from rlhf.config import LoraSettings, RewardConfig
from rlhf.modeling import TokenBatch, forward, load_base, token_logprobs
from rlhf.reward import RewardModel

PPO_TOPICS = ("cats", "dogs", "rain", "the sea", "music", "bread", "trains", "stars", "tea", "snow", "chess", "bees")
PROMPTS = [[{"role": "user", "content": f"Tell me about {topic}."}] for topic in PPO_TOPICS]
# Short answers and a small LoRA with a large learning rate keep these tests fast on two cores.
FAST = RewardConfig(
    lr=3e-3, epochs=3, batch_size=16, max_answer_tokens=16, lora=LoraSettings(r=8, alpha=16), precision="fp32"
)


@torch.no_grad()
def answer_logprobs(model: torch.nn.Module, batch: TokenBatch, temperature: float) -> torch.Tensor:
    """Logprobs of the batch's answer tokens from full logits, sliced independently of ppo.py. (B, R)"""
    r, p = batch.response_mask.shape[1], batch.prompt_len
    logits = forward(model, batch).logits[:, p - 1 : p - 1 + r].float() / temperature
    return token_logprobs(logits, batch.responses) * batch.response_mask


def make_reward_model(model_dir: Path, out: Path, seed: int = 7, metadata: dict | None = None) -> Path:
    """A saved reward model with random (non-zero) lora_B, so its adapter visibly changes its scores."""
    model = RewardModel(load_base(model_dir)[0], FAST)
    torch.manual_seed(seed)
    for name, param in model.body.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    model.calibrate(torch.tensor([-1.0, 0.5, 2.0]))
    return model.save(out, metadata)
