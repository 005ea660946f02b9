"""A random LoRA adapter for the serving benchmark: r=16, alpha=32, on every linear layer of the base.

peft initialises lora_B to zero, which makes an adapter a no-op; B is drawn from a small normal instead
so the adapter really changes the outputs (std 5e-3 moves the logits without breaking the answers).
"""

import argparse
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from service.engine.model import resolve_base_model
from service.settings import Settings

ADAPTER = "bench-lora-r16"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(settings: Settings, name: str = ADAPTER, b_std: float = 5e-3, seed: int = 0) -> Path:
    """Write the adapter to <data dir>/bench/<name> (kept if it is already there) and return its path."""
    out = settings.data_dir / "bench" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    if (out / "adapter_model.safetensors").exists():
        return out
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(resolve_base_model(settings), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if ".lora_B." in param_name:
                param.normal_(0.0, b_std)
    tmp = out.with_name(f"{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tmp.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Create the benchmark's random LoRA adapter.")
    parser.add_argument("--data-dir", type=Path, default=Settings().data_dir)
    parser.add_argument("--b-std", type=float, default=5e-3, help="std of the random lora_B init")
    args = parser.parse_args()
    print(make_adapter(Settings(data_dir=args.data_dir), b_std=args.b_std))


if __name__ == "__main__":
    main()
