"""A KV cache for continuous batching: preallocated slabs that rows can leave and join without copying the rest.

transformers' DynamicLayer concatenates on every step (a full copy of the cache per token). Here each layer
keeps its keys and values in a slab with spare rows and spare columns on both sides, and hands the model
views of the used block, rows [0, rows) and columns [start, end). The batch is right-aligned: every row's
newest token sits in column end - 1; columns a row does not use are hidden by the attention mask, which the
engine keeps (batch.py). Steps write in place; rows leave by compacting in place, columns that no row uses
any more leave by moving `start`; new rows join below the others, and a longer newcomer takes columns from
the spare room on the left. Columns inside the used block are always written (zeros when unused): a masked
column still meets a zero weight in attention, and 0 * NaN from uninitialised memory would poison the row.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer

HEADROOM = 64  # spare columns allocated on the right, so most steps write in place


class SlabLayer(DynamicLayer):
    def __init__(self) -> None:
        super().__init__()
        self.rows = self.start = self.end = 0
        self.slab_k: torch.Tensor | None = None  # (row capacity, kv_heads, column capacity, head_dim)
        self.slab_v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.end - self.start

    def _views(self) -> None:
        self.keys = self.slab_k[: self.rows, :, self.start : self.end]
        self.values = self.slab_v[: self.rows, :, self.start : self.end]

    def allocate(self, like: torch.Tensor, rows: int, columns: int, left: int = 0, right: int = HEADROOM) -> None:
        """A fresh slab for `rows` rows and `columns` used columns (zeros), `like` giving (heads, dim, dtype)."""
        _, h, _, d = like.shape
        self.slab_k = like.new_empty((rows, h, left + columns + right, d))
        self.slab_v = like.new_empty((rows, h, left + columns + right, d))
        self.is_initialized, self.device = True, like.device
        self.rows, self.start, self.end = rows, left, left + columns
        self._views()
        self.keys.zero_()
        self.values.zero_()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append (B, H, n, D) keys and values for the B rows in use; the views of every column so far."""
        n = key_states.shape[-2]
        if self.slab_k is None:
            self.allocate(key_states, key_states.shape[0], 0, right=n + HEADROOM)
        elif self.end + n > self.slab_k.shape[-2]:
            self._resize(self.rows, left=0, right=2 * (self.length + n))
        self.slab_k[: self.rows, :, self.end : self.end + n] = key_states
        self.slab_v[: self.rows, :, self.end : self.end + n] = value_states
        self.end += n
        self._views()
        return self.keys, self.values

    def _resize(self, row_capacity: int, left: int, right: int) -> None:
        """Move the used block into a new slab with this much room around it."""
        old_k, old_v, n = self.keys, self.values, self.length
        # Not zeroed: outside the used block nothing is read before it is written.
        self.slab_k = old_k.new_empty((row_capacity, old_k.shape[1], left + n + right, old_k.shape[-1]))
        self.slab_v = old_v.new_empty((row_capacity, old_v.shape[1], left + n + right, old_v.shape[-1]))
        self.slab_k[: self.rows, :, left : left + n] = old_k
        self.slab_v[: self.rows, :, left : left + n] = old_v
        self.start, self.end = left, left + n
        self._views()

    def get_seq_length(self) -> int:
        return self.length

    def select(self, rows: torch.Tensor, start: int) -> None:
        """Keep `rows` (in that order), of which the first `start` are already in place; no new allocation.

        The right side is gathered into a temporary before the write, so rows that overlap their new place
        are safe.
        """
        b = len(rows)
        if b > start:
            cols = slice(self.start, self.end)
            self.slab_k[start:b, :, cols] = self.slab_k[rows[start:], :, cols]
            self.slab_v[start:b, :, cols] = self.slab_v[rows[start:], :, cols]
        self.rows = b
        self._views()

    def drop_left(self, columns: int) -> None:
        self.start += columns
        self._views()

    def append_rows(self, other: "SlabLayer") -> None:
        """Add the rows of `other` below ours, right-aligned; the shorter side gets zero columns on the left."""
        n, m, r = self.length, other.length, other.rows
        if m > n and self.start < m - n:  # no room on the left for the newcomer's extra columns
            self._resize(max(self.slab_k.shape[0], self.rows + r), left=m - n, right=HEADROOM)
        elif self.rows + r > self.slab_k.shape[0]:
            self._resize(2 * (self.rows + r), left=self.start, right=self.slab_k.shape[-2] - self.end)
        if m > n:  # our rows take the extra columns on their left, as zeros
            self.slab_k[: self.rows, :, self.start - (m - n) : self.start] = 0
            self.slab_v[: self.rows, :, self.start - (m - n) : self.start] = 0
            self.start -= m - n
        new = slice(self.rows, self.rows + r)
        self.slab_k[new, :, self.start : self.end - m] = 0
        self.slab_v[new, :, self.start : self.end - m] = 0
        self.slab_k[new, :, self.end - m : self.end] = other.keys
        self.slab_v[new, :, self.end - m : self.end] = other.values
        self.rows += r
        self._views()

    def repeat_rows(self, repeats: torch.Tensor) -> None:
        k, v = self.keys.repeat_interleave(repeats, dim=0), self.values.repeat_interleave(repeats, dim=0)
        self.allocate(k, len(k), self.length)
        self.keys.copy_(k)
        self.values.copy_(v)


class BatchCache(Cache):
    """One SlabLayer per decoder layer, plus the batch-level operations the engine needs."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[SlabLayer() for _ in range(num_layers)])

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def rows(self) -> int:
        return self.layers[0].rows

    def allocate(self, like: torch.Tensor, rows: int, columns: int) -> None:
        """Zeroed storage for `rows` rows of `columns` columns; like: (_, kv_heads, _, head_dim), for the dtype."""
        for layer in self.layers:
            layer.allocate(like, rows, columns, right=HEADROOM)

    def select(self, rows: torch.Tensor, drop_left: int = 0) -> None:
        """Keep only `rows` (in that order) and drop the first `drop_left` columns (unused by every kept row)."""
        start = 0  # rows that stay where they are need no copy
        for row in rows.tolist():
            if row != start:
                break
            start += 1
        for layer in self.layers:
            layer.select(rows, start)
            layer.drop_left(drop_left)

    def repeat_rows(self, repeats: torch.Tensor) -> None:
        """Row i becomes repeats[i] identical rows (n > 1 choices share one prefill)."""
        for layer in self.layers:
            layer.repeat_rows(repeats)

    def merge(self, other: "BatchCache") -> None:
        """Append the rows of `other` below ours, right-aligned."""
        if self.layers[0].slab_k is None:
            self.layers = other.layers
            return
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            mine.append_rows(theirs)

    def row(self, row: int, columns: torch.Tensor | slice) -> torch.Tensor:
        """One row's keys and values at `columns` (of the used block): (layers, 2, kv_heads, n, head_dim)."""
        return torch.stack([torch.stack([layer.keys[row][:, columns], layer.values[row][:, columns]])
                            for layer in self.layers])

    def write(self, row: int, column: int, kv: torch.Tensor) -> None:
        """Put (layers, 2, kv_heads, n, head_dim) into `row` at used columns [column, column + n)."""
        n = kv.shape[-2]
        for layer, (k, v) in zip(self.layers, kv, strict=True):
            layer.keys[row, :, column : column + n] = k
            layer.values[row, :, column : column + n] = v
