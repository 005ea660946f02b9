"""A KV cache for continuous batching: preallocated slabs that rows can leave and join.

transformers' DynamicLayer concatenates on every step (a full copy of the cache per token). Here each
layer writes into a slab with spare room and hands the model views of the filled part. The batch is
right-aligned: every row's newest token sits in the same column, older rows have left padding that
the attention mask hides. Rows leave with `select`, a new batch joins with `merge`.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer

HEADROOM = 64  # free columns allocated past the filled part, so most steps write in place


class SlabLayer(DynamicLayer):
    def __init__(self) -> None:
        super().__init__()
        self.length = 0
        self.slab_k: torch.Tensor | None = None  # (B, kv_heads, capacity, head_dim)
        self.slab_v: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        if self.slab_k is None:
            self.is_initialized = True
            self.device = key_states.device
            self._allocate(key_states, value_states, n + HEADROOM)
        elif self.length + n > self.slab_k.shape[-2]:
            self._grow(2 * (self.length + n))
        self.slab_k[:, :, self.length : self.length + n] = key_states
        self.slab_v[:, :, self.length : self.length + n] = value_states
        self.length += n
        self.keys = self.slab_k[:, :, : self.length]
        self.values = self.slab_v[:, :, : self.length]
        return self.keys, self.values

    def _allocate(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> None:
        # Not zeroed: only the filled part is ever read.
        b, h, _, d = k.shape
        self.slab_k = k.new_empty((b, h, capacity, d))
        self.slab_v = v.new_empty((b, h, capacity, v.shape[-1]))

    def _grow(self, capacity: int) -> None:
        old_k, old_v = self.slab_k, self.slab_v
        self._allocate(old_k, old_v, capacity)
        self.slab_k[:, :, : self.length] = old_k[:, :, : self.length]
        self.slab_v[:, :, : self.length] = old_v[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def compact(self, rows: torch.Tensor, start: int, drop_left: int) -> None:
        """Keep `rows`, of which the first `start` are already in place, and drop `drop_left` columns.

        Done inside the slab, with no new allocation. The right side is gathered into a temporary
        before the write, so rows that overlap their new place are safe.
        """
        b, n = len(rows), self.length - drop_left
        self.slab_k[start:b, :, :n] = self.slab_k[rows[start:], :, drop_left : self.length]
        self.slab_v[start:b, :, :n] = self.slab_v[rows[start:], :, drop_left : self.length]
        self.slab_k, self.slab_v, self.length = self.slab_k[:b], self.slab_v[:b], n
        self.keys = self.slab_k[:, :, :n]
        self.values = self.slab_v[:, :, :n]

    def set(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Replace the contents with (B, H, T, D) tensors, keeping headroom."""
        self.length = k.shape[-2]
        self._allocate(k, v, self.length + HEADROOM)
        self.slab_k[:, :, : self.length] = k
        self.slab_v[:, :, : self.length] = v
        self.keys = self.slab_k[:, :, : self.length]
        self.values = self.slab_v[:, :, : self.length]


class BatchCache(Cache):
    """One SlabLayer per decoder layer, plus the batch-level operations the engine needs."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[SlabLayer() for _ in range(num_layers)])

    @property
    def length(self) -> int:
        return self.layers[0].length

    def select(self, rows: torch.Tensor, drop_left: int = 0) -> None:
        """Keep only `rows` (in that order) and drop the first `drop_left` columns (all padding)."""
        start = 0  # rows that stay where they are need no copy (when no columns are dropped)
        if drop_left == 0:
            for row in rows.tolist():
                if row != start:
                    break
                start += 1
        for layer in self.layers:
            layer.compact(rows, start, drop_left)

    def repeat_rows(self, repeats: torch.Tensor) -> None:
        """Row i becomes repeats[i] identical rows (n > 1 choices share one prefill)."""
        for layer in self.layers:
            layer.set(
                layer.keys.repeat_interleave(repeats, dim=0), layer.values.repeat_interleave(repeats, dim=0)
            )

    def merge(self, other: "BatchCache") -> None:
        """Append the rows of `other` below ours, left-padding whichever is shorter with zeros."""
        t = max(self.length, other.length)
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            k = torch.cat([_pad_left(mine.keys, t), _pad_left(theirs.keys, t)])
            v = torch.cat([_pad_left(mine.values, t), _pad_left(theirs.values, t)])
            mine.set(k, v)


def _pad_left(x: torch.Tensor, length: int) -> torch.Tensor:  # (B, H, T, D) -> (B, H, length, D)
    missing = length - x.shape[-2]
    if missing == 0:
        return x
    return torch.cat([x.new_zeros((*x.shape[:2], missing, x.shape[-1])), x], dim=-2)

