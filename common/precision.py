"""Which precision is the fast one on a device: one answer for serving (service/engine) and training (rlhf)."""

from typing import Literal

import torch


def bf16_is_fast(device: torch.device | str) -> bool:
    """bf16 matmuls are native here: a CUDA device that supports bf16, or a CPU with AVX512-BF16 or AMX, where
    oneDNN's bf16 matmuls run 2-2.5x faster than fp32 (docs/cpu-measurements.md). On an AVX2-only CPU bf16 is
    emulated: sampling under bf16 autocast took 5x as long as in fp32 and the PPO update gained nothing
    (bench/RESULTS.md, "Training precision on a CPU without native bf16")."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(precision: str, device: torch.device | str) -> Literal["bf16", "fp32"]:
    """'auto' as bf16 where it is fast on the device (bf16_is_fast), else fp32; 'bf16' and 'fp32' as they are."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', not {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return precision
