"""One answer to "is bf16 the fast precision here?" for the engine that serves and the code that trains."""

import pytest
import torch

from common.precision import bf16_is_fast, resolve_precision
from rlhf.modeling import autocast
from service.engine.model import resolve_dtype


def test_explicit_precisions_are_kept_and_unknown_ones_refused():
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="'auto', 'bf16' or 'fp32'"):
        resolve_precision("fp16", "cpu")


def test_auto_is_bf16_exactly_where_the_cpu_has_native_bf16():
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # AVX512-BF16 or AMX
    assert bf16_is_fast("cpu") == native
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    # serving picks the same: training and serving never disagree about this machine
    assert (resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16) == native


def test_training_autocast_follows_the_resolved_precision():
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        with autocast(precision, "cpu"):
            assert (x @ w).dtype == dtype
    with autocast("auto", "cpu"):
        assert (x @ w).dtype == (torch.bfloat16 if bf16_is_fast("cpu") else torch.float32)
