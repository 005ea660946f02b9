"""LoRA adapters (peft's safetensors format) turned into merged weights for serving.

Unmerged LoRA adds two small matmuls per linear layer per step, about a quarter of the decode time
at batch 16 here (docs/cpu-measurements.md). The engine instead serves each adapter from its own set
of merged linear weights, W + (alpha / r) * B @ A, computed in fp32 from the base weights and cast
to the serving dtype once. Modules the adapter does not touch share the base tensors.
"""

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file

from common.models import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter this server cannot serve (unsupported options, wrong base, bad files)."""


@dataclass(frozen=True)
class LoraAdapter:
    config: dict
    tensors: dict[str, torch.Tensor]

    @classmethod
    def from_dir(cls, path: Path) -> "LoraAdapter":
        try:
            config = json.loads((path / ADAPTER_CONFIG_FILE).read_text())
            tensors = load_file(path / ADAPTER_WEIGHTS_FILE)
        except (OSError, ValueError) as exc:
            raise AdapterError(f"cannot read adapter at {path}: {exc}") from exc
        return cls(config, tensors)

    @classmethod
    def from_bytes(cls, config: dict, blob: bytes) -> "LoraAdapter":
        return cls(config, load_safetensors_bytes(blob))

    def deltas(self) -> dict[str, torch.Tensor]:
        """Module name -> fp32 weight delta (out_features, in_features)."""
        return dict(self.iter_deltas())

    def iter_deltas(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(module name, fp32 weight delta) one module at a time: all of them at once would be an fp32 copy of
        every targeted weight (400 MB for SmolLM2), which the allocator then keeps."""
        check_supported(self.config)
        alpha = float(self.config["lora_alpha"])
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in self.tensors.items():
            if not key.startswith(PEFT_PREFIX) or ".lora_" not in key:
                raise AdapterError(f"unexpected tensor {key!r} in adapter")
            module, _, part = key[len(PEFT_PREFIX) :].rpartition(".lora_")
            pairs.setdefault(module, {})[part.split(".")[0]] = tensor
        if missing := [m for m, ab in pairs.items() if set(ab) != {"A", "B"}]:
            raise AdapterError(f"module {missing[0]!r} lacks lora_A or lora_B")
        for module, ab in pairs.items():
            a, b = ab["A"].float(), ab["B"].float()  # (r, in), (out, r)
            r = a.shape[0]
            scale = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
            yield module, scale * (b @ a)


def check_supported(config: dict) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"only LoRA adapters are served, not {config.get('peft_type')}")
    for option in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if config.get(option):
            raise AdapterError(f"adapter option {option!r} is not supported")
    for option in ("alpha_pattern", "modules_to_save", "rank_pattern"):
        if config.get(option):
            raise AdapterError(f"adapter option {option!r} is not supported")


def merged_weights(
    adapter: LoraAdapter, base_linear: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Parameter name -> merged weight in `dtype`, for every linear the adapter touches.

    base_linear maps module names to their full-precision base weights.
    """
    merged = {}
    for module, delta in adapter.iter_deltas():
        if module not in base_linear:
            raise AdapterError(f"adapter targets {module!r}, which the base model does not have")
        base = base_linear[module]
        if base.shape != delta.shape:
            raise AdapterError(f"adapter shape {tuple(delta.shape)} != base {tuple(base.shape)} at {module}")
        merged[f"{module}.weight"] = (base.float() + delta.to(base.device)).to(dtype)
    return merged


def validate(adapter: LoraAdapter, base_linear: dict[str, torch.Tensor]) -> None:
    """AdapterError unless the adapter merges into these base weights as a replica would merge it, giving finite
    weights: what `chatloop adapters import` checks before it registers a version."""
    for name, weight in merged_weights(adapter, base_linear, torch.float32).items():
        if not torch.isfinite(weight).all():
            raise AdapterError(f"adapter gives non-finite weights at {name}")
