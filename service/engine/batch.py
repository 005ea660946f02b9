"""Rows decoded together with one set of weights, their KV cache in segments of rows with similar lengths.

Every matmul of a step runs once over all the rows: that is where the weights are read, and reading them is
most of a step's cost. Attention is per segment: a segment's rows share a slab (kv_cache.py) right-aligned,
each row's newest token in the last column, and `valid` (b, S) says which columns a row really uses (a row
that joined with a shorter history has unused ones on its left; a prompt prefilled beside longer ones, or
continuing a cached prefix, may have some in the middle). A prompt joining a batch arrives as a segment of its
own, so it costs no copy of the others' keys and values, and rows of 100 tokens never attend over the
padding of a 1,500-token newcomer. Segments of similar width merge, and there are never more than a few.
"""

from dataclasses import dataclass, field

import torch
from torch import Tensor

from service.engine.forward import Forward
from service.engine.kv_cache import BatchCache

MAX_SEGMENTS = 4
MERGE_PADDING = 64  # adjacent segments merge when that pads their rows by this many columns on average, or less


@dataclass
class Segment:
    cache: BatchCache
    valid: Tensor  # (b, S) bool: row i uses cache column s
    pos: Tensor  # (b,) long: the position of each row's next token (= the columns it uses)

    @classmethod
    def empty(cls, num_layers: int, rows: int) -> "Segment":
        empty = torch.zeros((rows, 0), dtype=torch.bool)
        return cls(BatchCache(num_layers), empty, torch.zeros(rows, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.pos)

    @property
    def width(self) -> int:
        return self.valid.shape[1]

    def advance(self, fed: Tensor) -> tuple[Tensor, Tensor]:
        """The attention mask (b, 1, T, S+T) and positions (b, T) for feeding T more columns, `fed` (b, T)
        marking real tokens; the columns are counted in as used."""
        b, t = fed.shape
        if t == 1 and bool(fed.all()):  # a decode step: every row sees all its columns and itself
            self.valid = torch.cat([self.valid, fed], dim=1)  # (b, S + 1)
            mask, positions = self.valid[:, None, None, :], self.pos[:, None]
            self.pos = self.pos + 1
            return mask, positions
        causal = torch.ones((t, t), dtype=torch.bool).tril()  # (T, T)
        # A padding query sees itself, so its keys and values stay finite (a row of -inf gives NaN).
        own = causal[None] & fed[:, None, :] | torch.eye(t, dtype=torch.bool)  # (b, T, T)
        mask = torch.cat([self.valid[:, None, :].expand(b, t, -1), own], dim=-1)[:, None]  # (b, 1, T, S+T)
        positions = (self.pos[:, None] + fed.cumsum(-1) - 1).clamp(min=0)  # (b, T)
        self.valid = torch.cat([self.valid, fed], dim=1)
        self.pos = self.pos + fed.sum(-1)
        return mask, positions

    def keep(self, rows: Tensor) -> None:
        valid = self.valid[rows]
        used = valid.any(0).nonzero()
        drop = int(used[0]) if len(used) else valid.shape[1]  # columns no kept row uses any more
        self.cache.select(rows, drop_left=drop)
        self.valid, self.pos = valid[:, drop:], self.pos[rows]

    def repeat(self, counts: Tensor) -> None:
        self.cache.repeat_rows(counts)
        self.valid = self.valid.repeat_interleave(counts, dim=0)
        self.pos = self.pos.repeat_interleave(counts, dim=0)

    def merge(self, other: "Segment") -> None:
        """Take the rows of `other` below ours (a copy of theirs, right-aligned)."""
        width = max(self.width, other.width)
        self.cache.merge(other.cache)
        self.valid = torch.cat([_pad_left(self.valid, width), _pad_left(other.valid, width)])
        self.pos = torch.cat([self.pos, other.pos])

    def padding_if_merged(self, other: "Segment") -> int:
        width = max(self.width, other.width)
        return len(self) * (width - self.width) + len(other) * (width - other.width)

    def history(self, row: int) -> Tensor:
        """Row `row`'s keys and values over the columns it uses, oldest first: (layers, 2, kv_heads, n, dim)."""
        used = self.valid[row].nonzero().squeeze(-1)
        first = int(used[0]) if len(used) else 0
        columns = slice(first, None) if len(used) == self.width - first else used
        return self.cache.row(row, columns)


@dataclass
class Rows:
    forward: Forward
    segments: list[Segment]
    seqs: list = field(default_factory=list)  # what the engine tracks per row (its _Sequence objects)
    # Set once the rows decode: the token each row feeds next, and its sampling parameters. (B,) each
    last: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    temperature: Tensor = field(default_factory=lambda: torch.zeros(0))
    top_p: Tensor = field(default_factory=lambda: torch.zeros(0))

    @classmethod
    def empty(cls, forward: Forward, rows: int) -> "Rows":
        return cls(forward, [Segment.empty(forward.num_layers, rows)])

    def __len__(self) -> int:
        return sum(len(s) for s in self.segments)

    @property
    def pos(self) -> Tensor:
        return torch.cat([s.pos for s in self.segments])

    def feed(self, ids: Tensor, fed: Tensor, logits: bool = True) -> Tensor | None:
        """Run `ids` (B, T) through the model; `fed` (B, T) marks real tokens, False for padding.

        Returns the logits (B, V) at the last column, or None when `logits` is False.
        """
        parts, positions, start = [], [], 0
        for segment in self.segments:
            mask, pos = segment.advance(fed[start : start + len(segment)])
            parts.append((mask, segment.cache))
            positions.append(pos)
            start += len(segment)
        positions = positions[0] if len(positions) == 1 else torch.cat(positions)
        return self.forward(ids, positions, parts, logits)

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in increasing order); segments left empty go."""
        index = torch.tensor(rows, dtype=torch.long)
        kept, start = [], 0
        for segment in self.segments:
            mine = index[(index >= start) & (index < start + len(segment))] - start
            start += len(segment)
            if len(mine):
                segment.keep(mine)
                kept.append(segment)
        self.segments = kept
        self.last, self.temperature, self.top_p = self.last[index], self.temperature[index], self.top_p[index]
        self.seqs = [self.seqs[i] for i in rows]
        self._consolidate()

    def repeat(self, repeats: list[int]) -> None:
        """Row i becomes repeats[i] identical rows (the choices of one prompt); rows of one segment only."""
        counts = torch.tensor(repeats, dtype=torch.long)
        if bool((counts != 1).any()):
            (segment,) = self.segments
            segment.repeat(counts)

    def merge(self, other: "Rows") -> None:
        """Take the rows of `other` (same weights) below ours, as segments of their own where that saves padding."""
        self.segments += other.segments
        self.last = torch.cat([self.last, other.last])
        self.temperature = torch.cat([self.temperature, other.temperature])
        self.top_p = torch.cat([self.top_p, other.top_p])
        self.seqs += other.seqs
        self._consolidate()

    def _consolidate(self) -> None:
        """Merge adjacent segments that pad little, and the cheapest pairs while there are too many."""
        limit = MAX_SEGMENTS if self.forward.segmented else 1
        i = 0
        while i + 1 < len(self.segments):
            a, b = self.segments[i], self.segments[i + 1]
            if a.padding_if_merged(b) <= MERGE_PADDING * (len(a) + len(b)):
                a.merge(self.segments.pop(i + 1))
            else:
                i += 1
        while len(self.segments) > limit:
            i = min(range(len(self.segments) - 1),
                    key=lambda j: self.segments[j].padding_if_merged(self.segments[j + 1]))
            self.segments[i].merge(self.segments.pop(i + 1))

    def history(self, row: int) -> Tensor:
        for segment in self.segments:
            if row < len(segment):
                return segment.history(row)
            row -= len(segment)
        raise IndexError(row)


def _pad_left(valid: Tensor, width: int) -> Tensor:
    missing = width - valid.shape[1]
    if missing == 0:
        return valid
    return torch.cat([torch.zeros((len(valid), missing), dtype=torch.bool), valid], dim=1)
