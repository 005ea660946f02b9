"""Models and token batches for training: the base in training precision, LoRA, chat tokenisation.

Batches use the layout of OpenAI's lm-human-preferences and TRL: prompts left-padded to a common
length P, answers right-padded to R, so answer token j of every row sits at column P + j and its
logits at column P + j - 1.
"""

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from common.models import ADAPTER_FILES
from common.precision import resolve_precision
from rlhf.config import LoraSettings, Precision


def autocast(precision: Precision, device: torch.device | str = "cpu"):
    """Matmuls in bf16 over the fp32 master weights ("bf16"), or plain fp32; "auto": bf16 where the device runs it
    natively (common.precision.bf16_is_fast). On a CPU with AMX bf16 matmuls run 2-2.5x faster
    (docs/cpu-measurements.md), on one without it several times slower; LoRA weights, optimiser state, losses,
    log-softmax and the heads stay fp32, so only the activations lose precision. Wrap forward passes, not
    backward."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve_precision(precision, device) == "bf16")


def peft_config(lora: LoraSettings) -> LoraConfig:
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        bias="none", task_type="CAUSAL_LM",
    )


def load_base(
    path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model for training on `device`, in fp32 master weights (forward passes autocast to bf16, see
    autocast), dropout off (every careful RLHF reproduction disables it: it would make logprobs random), frozen."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.eval().requires_grad_(False)
    return model, tokenizer


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_answer(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int | None = None) -> list[int]:
    """Answer tokens ending in EOS, as the policy would have produced them (truncated: no EOS)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids[:max_tokens] if max_tokens else ids


def answer_ids(tokenizer: PreTrainedTokenizerBase, answer: str, ended: bool, max_tokens: int) -> list[int]:
    """An answer's tokens as the policy emitted them: ending in EOS if it stopped there, not if it was cut off at
    the length limit (a reader of the answer can tell the two apart; so must the reward model)."""
    ids = encode_answer(tokenizer, answer, max_tokens)
    return ids if ended or len(ids) < 2 else ids[:-1] if ids[-1] == tokenizer.eos_token_id else ids


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    response_mask: torch.Tensor  # (B, R) 1 on answer tokens
    prompt_len: int  # P
    position_ids: torch.Tensor = field(init=False)  # (B, P + R)

    def __post_init__(self) -> None:
        self.position_ids = (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def responses(self) -> torch.Tensor:  # (B, R)
        return self.input_ids[:, self.prompt_len :]

    @property
    def response_lengths(self) -> torch.Tensor:  # (B,)
        return self.response_mask.sum(-1)

    def to(self, device: torch.device) -> "TokenBatch":
        moved = TokenBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device), self.prompt_len
        )
        return moved

    def select(self, rows: torch.Tensor) -> "TokenBatch":
        return TokenBatch(self.input_ids[rows], self.attention_mask[rows], self.response_mask[rows], self.prompt_len)


def build_batch(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> TokenBatch:
    p = max(len(x) for x in prompts)
    r = max(1, max(len(x) for x in answers))
    ids = torch.full((len(prompts), p + r), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    response_mask = torch.zeros((len(prompts), r), dtype=torch.long)
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        ids[row, p - len(prompt) : p] = torch.tensor(prompt)
        ids[row, p : p + len(answer)] = torch.tensor(answer, dtype=torch.long)
        mask[row, p - len(prompt) : p + len(answer)] = 1
        response_mask[row, : len(answer)] = 1
    return TokenBatch(ids, mask, response_mask, p)


def forward(
    model: torch.nn.Module, batch: TokenBatch, hidden: bool = False, logits_to_keep: int = 0,
    precision: Precision = "fp32",
):
    """The model on a batch. logits_to_keep=k computes logits for the last k columns only (0: all):
    (B, T, vocab) logits cost more than the whole trunk of a small model and are often unused."""
    with autocast(precision, batch.input_ids.device):
        return model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
            output_hidden_states=hidden, use_cache=False, logits_to_keep=logits_to_keep,
        )


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under logits. logits (B, R, V), tokens (B, R) -> (B, R)"""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def last_token_index(batch: TokenBatch) -> torch.Tensor:
    """Column of each row's last real token (the end of its answer). (B,)"""
    return batch.prompt_len + batch.response_lengths - 1


def save_adapter(policy: PeftModel, out_dir: Path) -> Path:
    """Save the adapter alone (peft format, safetensors) under a temp name, then rename into place."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        policy.save_pretrained(tmp, safe_serialization=True, selected_adapters=["default"])
        for path in tmp.iterdir():  # peft also writes a model card (README.md)
            if path.name not in ADAPTER_FILES:
                path.unlink()
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
