"""One decode step of SmolLM2 in bf16, each way the engine could run it: `python -m bench.forward`.

transformers' forward with its own cache; the lean forward (service/engine/llama.py) with plain `F.linear`
and with the weights prepacked for oneDNN (what the engine serves); and the lean forward with its per-layer
maths compiled by inductor (`torch.compile`, dynamic shapes, weights as inputs: weights frozen into the graph
would mean a compile per adapter version, minutes each, against swaps meant to take milliseconds; and
inductor does not lower the prepacked matmuls). Rows of 170 cached tokens; the median step in CPU time of
the calling thread, on one thread, so that other work on shared cores skews it less than wall time would.
"""

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache

from service.engine import llama
from service.engine.batch import Rows
from service.engine.llama import LlamaForward
from service.engine.model import resolve_base_model
from service.settings import Settings

CACHED = 170


class CompiledLayers:
    """The lean forward's maths with each layer's work before and after attention compiled (plain weights)."""

    segmented, exact, serial = True, None, 0

    def __init__(self, model: torch.nn.Module) -> None:
        self.lean = LlamaForward(model)  # for the shapes, the RoPE table and the final norm
        self.num_layers = self.lean.num_layers
        inner = model.model
        self.layers = [
            (layer.input_layernorm.weight,
             torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight]),
             layer.self_attn.o_proj.weight, layer.post_attention_layernorm.weight,
             torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]), layer.mlp.down_proj.weight)
            for layer in inner.layers
        ]
        self.before = torch.compile(self._before, dynamic=True)
        self.after = torch.compile(self._after, dynamic=True)

    def _before(self, x, ln1, qkv_w, cos, sin):
        lean, (b, t) = self.lean, x.shape[:2]
        h, kvh, g, d = lean.heads, lean.kv_heads, lean.group, lean.head_dim
        qkv = F.linear(F.rms_norm(x, ln1.shape, ln1, lean.eps), qkv_w)
        qk = qkv[..., : (h + kvh) * d].view(b, t, h + kvh, 2, d // 2)
        qk = (qk * cos + qk.flip(-2) * sin).view(b, t, h + kvh, d)
        v = qkv[..., (h + kvh) * d :].view(b, t, kvh, d).transpose(1, 2)
        q = qk[:, :, :h].view(b, t, kvh, g, d).permute(0, 2, 1, 3, 4).reshape(b, kvh, t * g, d)
        return q, qk[:, :, h:].transpose(1, 2), v

    def _after(self, x, out, o_w, ln2, gate_up_w, down_w):
        lean, (b, t) = self.lean, x.shape[:2]
        out = out.view(b, lean.kv_heads, t, lean.group, lean.head_dim).permute(0, 2, 1, 3, 4).reshape(b, t, -1)
        x = x + F.linear(out, o_w)
        gate, up = F.linear(F.rms_norm(x, ln2.shape, ln2, lean.eps), gate_up_w).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, down_w)

    def __call__(self, ids, positions, segments, logits=True):
        lean = self.lean
        ((mask, cache),) = segments
        if ids.shape[1] > 1:
            mask = mask.repeat_interleave(lean.group, dim=2)
        cos, sin = lean.cos[positions][:, :, None], lean.sin[positions][:, :, None]
        x = F.embedding(ids, lean.embed)
        for i, (ln1, qkv_w, o_w, ln2, gate_up_w, down_w) in enumerate(self.layers):
            q, k, v = self.before(x, ln1, qkv_w, cos, sin)
            x = self.after(x, llama._attend(q, k, v, mask, cache, i), o_w, ln2, gate_up_w, down_w)
        return F.linear(F.rms_norm(x[:, -1], lean.norm.shape, lean.norm, lean.eps), lean.embed) if logits else None


def step_ms(forward, batch: int, steps: int = 12) -> float:
    rows = Rows.empty(forward, batch)
    rows.feed(torch.randint(0, 49000, (batch, CACHED)), torch.ones((batch, CACHED), dtype=torch.bool), logits=False)
    times = []
    for _ in range(steps):
        started = time.thread_time()
        rows.feed(torch.randint(0, 49000, (batch, 1)), torch.ones((batch, 1), dtype=torch.bool))
        times.append(time.thread_time() - started)
    return 1000 * statistics.median(times[2:])


def transformers_ms(model: torch.nn.Module, batch: int, steps: int = 12) -> float:
    cache = DynamicCache()
    model(torch.randint(0, 49000, (batch, CACHED)), past_key_values=cache, use_cache=True, logits_to_keep=1)
    times = []
    for _ in range(steps):
        started = time.thread_time()
        model(torch.randint(0, 49000, (batch, 1)), past_key_values=cache, use_cache=True, logits_to_keep=1)
        times.append(time.thread_time() - started)
    return 1000 * statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Settings().data_dir)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(resolve_base_model(Settings(data_dir=args.data_dir)),
                                                 dtype=torch.bfloat16).eval()
    packed = LlamaForward(copy.deepcopy(model))
    original, llama.packs = llama.packs, lambda weight: False
    plain = LlamaForward(copy.deepcopy(model))
    llama.packs = original
    compiled = CompiledLayers(copy.deepcopy(model))
    ways = {"transformers forward": lambda b: transformers_ms(model, b), "lean, F.linear": lambda b: step_ms(plain, b),
            "lean, prepacked (served)": lambda b: step_ms(packed, b),
            "lean, torch.compile per layer": lambda b: step_ms(compiled, b)}
    print(f"| way | {' | '.join(f'{b} row(s), ms' for b in args.batches)} |")
    print("|---" * (len(args.batches) + 1) + "|")
    with torch.inference_mode():
        for name, run in ways.items():
            print(f"| {name} | {' | '.join(f'{run(b):.1f}' for b in args.batches)} |", flush=True)


if __name__ == "__main__":
    main()
