"""The model call the engine makes: the lean Llama forward where it applies, transformers' otherwise.

Both take (ids, positions, segments of (mask, cache)) with the same meaning and append to the same cache (kv_cache.py),
so everything else in the engine is the same whichever runs. Each forward gets a serial number: rows, and
cached prefixes, are only ever shared between users of the same forward, so a version reloaded with other
weights under the same name can never continue another's keys and values.
"""

import itertools
from typing import Protocol

import torch
from torch import Tensor

from service.engine.kv_cache import BatchCache
from service.engine.llama import LlamaForward, supports

_serials = itertools.count(1)


class Forward(Protocol):
    serial: int
    num_layers: int
    segmented: bool  # takes several segments of rows, each with its own cache (else exactly one)
    # After a call that returned logits in bf16: (final hidden states (B, hidden), head weight (V, hidden)),
    # for greedy rows to settle near-ties in fp32 (sampling.py); None when the logits need no such care.
    exact: tuple[Tensor, Tensor] | None

    def __call__(
        self, ids: Tensor, positions: Tensor, segments: list[tuple[Tensor, BatchCache]], logits: bool = True
    ) -> Tensor | None: ...


class TransformersForward:
    """Any causal LM through its own forward; the mask is the 4D boolean one for sdpa, (B, S) for others."""

    segmented = False

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.num_layers = model.config.num_hidden_layers
        self.mask_4d = model.config._attn_implementation == "sdpa"
        self.exact = None

    def __call__(
        self, ids: Tensor, positions: Tensor, segments: list[tuple[Tensor, BatchCache]], logits: bool = True
    ) -> Tensor | None:
        ((mask, cache),) = segments
        # Eager attention builds its own float mask from a (B, S) one plus causality, which is the same
        # mask wherever a query is a real token (padding queries' outputs are never used).
        attention_mask = mask if self.mask_4d else mask[:, 0, -1]
        out = self.model(
            input_ids=ids, attention_mask=attention_mask, position_ids=positions, cache=cache, use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1] if logits else None  # (B, V)


def make_forward(model: torch.nn.Module, base: Forward | None = None) -> Forward:
    """The forward to serve `model` with; `base` (the base model's) lends an adapter what it leaves alone."""
    if supports(model):
        forward = LlamaForward(model, base if isinstance(base, LlamaForward) else None)
    else:
        forward = TransformersForward(model)
    forward.serial = next(_serials)
    return forward
