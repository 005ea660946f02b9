"""A lean forward for plain Llama models (SmolLM2 is one), over the engine's KV slabs.

transformers' Llama forward runs about 6,800 torch ops per decode step on SmolLM2 (hooks, mask and cache
bookkeeping, dtype casts around every norm), and on two CPU cores that cost is a large share of a step.
This forward does the same maths in about 15 ops per layer: q, k and v are one matmul, gate and up
another, and the residual adds ride on the matmuls before them; RoPE on q and k together is three ops over
a precomputed table; the query heads that share a KV head attend as one block of query rows (no repeated
KV, no GQA path in sdpa, which is several times slower on CPU for a one-token query); RMSNorm is one op.
Logits come only for each row's last position, and not at all for a prefill chunk that ends no prompt.

In bf16 on CPU the weights are prepacked once into oneDNN's blocked layout: `F.linear` reorders the weight
on every call, and the prepacked matmul is about twice as fast at every batch size here (bench/forward.py,
bench/RESULTS.md). Models whose maths is not exactly this keep the transformers forward (`supports`,
forward.py).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from service.engine.kv_cache import BatchCache

# RoPE variants whose frequencies depend only on the position, so one table serves every length.
STATIC_ROPE = {"default", "linear", "llama3", "yarn"}
PACK_BATCH_HINT = 16  # oneDNN picks the blocked layout for this many rows; any batch size works with it


def supports(model: torch.nn.Module) -> bool:
    """Whether `model` is a Llama this forward computes exactly."""
    config = model.config
    rope = (getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}).get(
        "rope_type", "default"
    )
    attn = model.model.layers[0].self_attn
    return (
        config.model_type == "llama"
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
        and config.hidden_act == "silu"
        and getattr(config, "pretraining_tp", 1) == 1
        and rope in STATIC_ROPE
        and attn.q_proj.out_features % config.num_attention_heads == 0
        and config.num_attention_heads % config.num_key_value_heads == 0
    )


def packs(weight: Tensor) -> bool:
    """Whether weights like this one are served prepacked (bf16 on a CPU with oneDNN bf16 support)."""
    return (
        weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


class Linears:
    """Matmuls against a model's weights, prepacked or plain; `reuse` (the base's) shares what it made."""

    def __init__(self, packed: bool, reuse: "Linears | None" = None) -> None:
        self.packed = packed
        # The base's: ids of the source weights -> (the sources, kept so that their ids stay theirs, and the
        # weight made from them). An adapter shares every weight it leaves alone with the base, and then the
        # prepacked copy too; it remembers nothing itself, so its merged weights go once they are packed.
        self.made: dict[tuple[int, ...], tuple[tuple[Tensor, ...], Tensor]] | None = None if reuse else {}
        self._reuse = reuse.made if reuse else {}

    def weight(self, *parts: Tensor) -> Tensor:
        """The (fused, when several) weight in the form `matmul` takes: the parts' outputs side by side."""
        key = tuple(id(p) for p in parts)
        known = self._reuse.get(key)
        if known is not None and all(a is b for a, b in zip(known[0], parts, strict=True)):
            return known[1]
        fused = parts[0].detach() if len(parts) == 1 else torch.cat([p.detach() for p in parts])  # (outs, in)
        if self.packed:
            fused = torch.ops.mkldnn._reorder_linear_weight(fused, PACK_BATCH_HINT)
        if self.made is not None:
            self.made[key] = (parts, fused)
        return fused

    def matmul(self) -> Callable[[Tensor, Tensor], Tensor]:
        if self.packed:
            return lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return F.linear

    def matmul_add(self) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """x @ w.T + residual, fused into the matmul's output when packed."""
        if self.packed:
            return lambda x, w, residual: torch.ops.mkldnn._linear_pointwise.binary(x, residual, w, None, "add")
        return lambda x, w, residual: residual + F.linear(x, w)


class LlamaForward:
    """forward(ids, positions, segments) -> next-token logits at each row's last position (or None)."""

    segmented = True  # attention per segment of rows (batch.py)

    def __init__(self, model: torch.nn.Module, base: "LlamaForward | None" = None) -> None:
        config = model.config
        inner = model.model
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.group = self.heads // self.kv_heads
        self.head_dim = inner.layers[0].self_attn.q_proj.out_features // self.heads
        self.eps = config.rms_norm_eps
        self.num_layers = len(inner.layers)
        self.embed = inner.embed_tokens.weight  # (V, hidden)
        self.norm = inner.norm.weight
        self.linears = Linears(packs(self.embed), base.linears if base is not None else None)
        w = self.linears.weight
        self.layers = [
            (
                layer.input_layernorm.weight,
                w(layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight),
                w(layer.self_attn.o_proj.weight),
                layer.post_attention_layernorm.weight,
                w(layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight),
                w(layer.mlp.down_proj.weight),
            )
            for layer in inner.layers
        ]
        self.head_weight = model.lm_head.weight  # (V, hidden); the embedding when tied
        self.lm_head = w(self.head_weight)
        self.exact: tuple[Tensor, Tensor] | None = None  # the last call's (final hidden states, head weight)
        self.matmul, self.matmul_add = self.linears.matmul(), self.linears.matmul_add()
        if base is not None and base.cos.dtype == self.embed.dtype:
            self.cos, self.sin = base.cos, base.sin
        else:
            self.cos, self.sin = rope_table(model)  # (P, 2, head_dim / 2) each

    def __call__(
        self, ids: Tensor, positions: Tensor, segments: list[tuple[Tensor, BatchCache]], logits: bool = True
    ) -> Tensor | None:
        """ids, positions: (B, T); segments: consecutive rows, each (mask (b, 1, T, S) bool, True where a query
        may look, S = its cached columns + T; its cache).

        Appends the T tokens' keys and values to each segment's cache; returns the logits (B, V) at position
        T - 1, or None when `logits` is False.
        """
        b, t = ids.shape
        h, kvh, g, d = self.heads, self.kv_heads, self.group, self.head_dim
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # (B, T, 1, 2, d/2)
        if t > 1:  # query rows are (token, head in group): (b, 1, T*g, S)
            segments = [(mask.repeat_interleave(g, dim=2), cache) for mask, cache in segments]
        matmul, matmul_add = self.matmul, self.matmul_add
        x = F.embedding(ids, self.embed)  # (B, T, hidden)
        for i, (ln1, qkv_w, o_w, ln2, gate_up_w, down_w) in enumerate(self.layers):
            qkv = matmul(F.rms_norm(x, ln1.shape, ln1, self.eps), qkv_w)  # (B, T, (h + 2 kvh) d)
            qk = qkv[..., : (h + kvh) * d].view(b, t, h + kvh, 2, d // 2)
            # RoPE, rotate-half form: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); the table's sin has its
            # first half negated, so this is x * cos + flip(x) * sin.
            qk = torch.addcmul(qk * cos, qk.flip(-2), sin).view(b, t, h + kvh, d)
            k = qk[:, :, h:].transpose(1, 2)  # (B, kvh, T, d)
            v = qkv[..., (h + kvh) * d :].view(b, t, kvh, d).transpose(1, 2)
            q = qk[:, :, :h].view(b, t, kvh, g, d).permute(0, 2, 1, 3, 4).reshape(b, kvh, t * g, d)
            if len(segments) == 1:
                out = _attend(q, k, v, *segments[0], i)  # (B, kvh, T*g, d)
            else:
                outs, r = [], 0
                for mask, cache in segments:
                    n = mask.shape[0]
                    outs.append(_attend(q[r : r + n], k[r : r + n], v[r : r + n], mask, cache, i))
                    r += n
                out = torch.cat(outs)
            out = out.view(b, kvh, t, g, d).permute(0, 2, 1, 3, 4).reshape(b, t, h * d)
            x = matmul_add(out, o_w, x)
            gate, up = matmul(F.rms_norm(x, ln2.shape, ln2, self.eps), gate_up_w).chunk(2, dim=-1)
            x = matmul_add(F.silu(gate) * up, down_w, x)
        if not logits:
            return None
        hidden = F.rms_norm(x[:, -1], self.norm.shape, self.norm, self.eps)  # (B, hidden)
        if self.linears.packed:  # bf16 logits tie near-equal tokens: greedy rows rescore their best in fp32
            self.exact = (hidden, self.head_weight)
        return matmul(hidden, self.lm_head)  # (B, V)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, cache: BatchCache, layer: int) -> Tensor:
    """Append k and v (b, kvh, T, d) to the cache's layer; attention of q (b, kvh, T*g, d) over all of it."""
    keys, values = cache.layers[layer].update(k, v)  # (b, kvh, S, d)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def rope_table(model: torch.nn.Module) -> tuple[Tensor, Tensor]:
    """cos and sin of every position, (P, 2, d/2) each, sin's first half negated.

    Taken from the model's own rotary module, so every static RoPE variant and its attention scaling come
    out as transformers computes them (in fp32, then cast to the model's dtype).
    """
    positions = torch.arange(model.config.max_position_embeddings, device=model.device)[None]  # (1, P)
    probe = torch.zeros((), dtype=model.dtype, device=model.device)
    cos, sin = model.model.rotary_emb(probe, positions)  # (1, P, d), both halves equal
    half = cos.shape[-1] // 2
    sign = torch.tensor([-1.0, 1.0], dtype=sin.dtype, device=sin.device)[:, None]  # (2, 1)
    return cos[0].view(-1, 2, half).contiguous(), (sin[0].view(-1, 2, half) * sign).contiguous()
