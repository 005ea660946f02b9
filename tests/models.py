"""LoRA adapters for the tiny test model (the model itself is the `tiny_model_dir` fixture in conftest.py)."""

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(model_dir: Path, out: Path, seed: int, b_std: float = 0.5, r: int = 8) -> Path:
    """A LoRA adapter with random (non-zero) B, so it visibly changes the model's output."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=b_std)
    peft_model.save_pretrained(out)
    return out
