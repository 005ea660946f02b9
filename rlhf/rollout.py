"""Answers of a policy and what training needs of them: sampling (pure temperature, so logits / T is the
distribution sampled from), the tempered logits that predicted each answer token, the value head that reads the
same states, and what a batch of sampled answers carries through a PPO iteration. Shared by PPO, the gate's
evaluation and the benchmarks."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from common.conversations import Messages
from rlhf.config import Precision
from rlhf.modeling import TokenBatch, autocast, build_batch, encode_prompt, forward

# (prompt conversations, answer texts, answer token ids incl. EOS if produced) -> one score per answer (B,)
RewardFn = Callable[[list[Messages], list[str], list[list[int]]], torch.Tensor]


@dataclass
class Rollouts:
    prompts: list[Messages]
    answer_texts: list[str]
    answer_ids: list[list[int]]
    batch: TokenBatch
    has_eos: torch.Tensor  # (B,) bool
    logprobs: torch.Tensor  # (B, R) policy at sampling time ("old")
    ref_logprobs: torch.Tensor  # (B, R) adapter disabled
    values: torch.Tensor  # (B, R); zeros without a critic
    entropy: torch.Tensor  # (B, R) of the policy's (tempered) next-token distribution
    seconds: float = 0.0  # the time recompute() took


class ValueHead(torch.nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        # The N Implementation Details: head weights ~ N(0, 1/sqrt(d + 1)), bias 0
        torch.nn.init.normal_(self.linear.weight, std=1 / (hidden_size + 1) ** 0.5)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, R, H) -> (B, R)
        return self.linear(hidden).squeeze(-1)


def forward_answers(
    model: torch.nn.Module, batch: TokenBatch, temperature: float, value_head: ValueHead | None = None,
    precision: Precision = "fp32",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tempered logits that predicted each answer token (B, R, V) and the values of those states (B, R).

    Only the last R + 1 positions get logits: a (B, P + R, V) tensor over prompts is wasted memory.
    """
    out = forward(
        model, batch, hidden=value_head is not None, logits_to_keep=batch.response_mask.shape[1] + 1,
        precision=precision,
    )
    logits = out.logits[:, :-1].float() / temperature  # (B, R, V)
    values = None if value_head is None else value_head(out.hidden_states[-1][:, batch.prompt_len - 1 : -1].float())
    return logits, values


@torch.no_grad()
def generate(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[Messages], temperature: float,
    max_new_tokens: int, eos_ids: set[int], precision: Precision = "fp32", max_prompt_tokens: int = 512,
) -> tuple[list[list[int]], TokenBatch]:
    """Sample one answer per prompt (pure temperature sampling: no top-k/top-p, so logits / T is the
    distribution sampled from). A conversation longer than max_prompt_tokens keeps its end, as the reward model
    reads it. Returns the answer ids (ending in EOS when produced) and their batch."""
    pad_id = tokenizer.pad_token_id
    prompt_ids = [encode_prompt(tokenizer, messages)[-max_prompt_tokens:] for messages in prompts]
    inputs = tokenizer.pad({"input_ids": prompt_ids}, padding_side="left", return_tensors="pt")
    device = next(model.parameters()).device
    with autocast(precision, device):
        output = model.generate(
            input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device),
            do_sample=True, temperature=temperature, top_k=0, top_p=1.0, repetition_penalty=1.0,
            max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=sorted(eos_ids),
        )
    answer_ids = [cut_at_eos(row.tolist(), eos_ids) for row in output[:, inputs["input_ids"].shape[1] :]]
    return answer_ids, build_batch(prompt_ids, answer_ids, pad_id).to(device)


def cut_at_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    """Generated ids up to and including the first EOS (generate pads finished rows after it)."""
    for i, token in enumerate(ids):
        if token in eos_ids:
            return ids[: i + 1]
    return ids
