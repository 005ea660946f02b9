"""Keys and values of recent token sequences, so a prompt that starts like one of them skips that part.

Chat clients resend the whole conversation every turn, and many share a system prompt. Each entry is the
history of one finished answer (prompt and answer) or of one prompt just prefilled, under the forward that
computed it (forward.py: a different adapter, or other weights under the same name, is a different key).
A new prompt continues from the entry that shares its longest prefix with it, copying only that part.
Entries are kept least recently used first out, within a byte budget; an entry that is a prefix of a newer
one is dropped when the newer one arrives (it can only ever match less).
"""

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

MIN_REUSE = 16  # shorter shared prefixes are not worth the copy


@dataclass
class Entry:
    ids: np.ndarray  # (n,) int64: the tokens whose keys and values `kv` holds
    kv: torch.Tensor  # (layers, 2, kv_heads, n, head_dim)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() + self.ids.nbytes


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.reused_tokens = 0  # for metrics and tests
        self._entries: OrderedDict[tuple[int, int], Entry] = OrderedDict()  # (forward serial, id) -> entry
        self._next = 0
        self._lock = threading.Lock()  # the engine thread uses it; other threads drop forwards

    def lookup(self, serial: int, ids: list[int]) -> tuple[int, Entry | None]:
        """The longest cached prefix of `ids` (at most all but the last token, which must be fed): its length
        and entry, or (0, None) when none is MIN_REUSE tokens long."""
        query = np.asarray(ids, dtype=np.int64)
        best, found, key = 0, None, None
        with self._lock:
            for k, entry in self._entries.items():
                if k[0] == serial and (n := common_prefix(entry.ids, query)) > best:
                    best, found, key = n, entry, k
            best = min(best, len(ids) - 1)
            if best < MIN_REUSE:
                return 0, None
            self._entries.move_to_end(key)
            self.hits += 1
            self.reused_tokens += best
        return best, found

    def store(self, serial: int, ids: list[int], kv: torch.Tensor) -> None:
        """Keep `kv` (layers, 2, kv_heads, len(ids), head_dim) as the history of `ids`."""
        entry = Entry(np.asarray(ids, dtype=np.int64), kv)
        if len(ids) < MIN_REUSE or entry.nbytes > self.max_bytes:
            return
        with self._lock:
            for k in [k for k, e in self._entries.items()
                      if k[0] == serial and len(e.ids) <= len(ids) and common_prefix(e.ids, entry.ids) == len(e.ids)]:
                self.bytes -= self._entries.pop(k).nbytes
            self._next += 1
            self._entries[(serial, self._next)] = entry
            self.bytes += entry.nbytes
            while self.bytes > self.max_bytes:
                self.bytes -= self._entries.popitem(last=False)[1].nbytes

    def drop(self, serial: int) -> None:
        """Forget everything a forward computed (its adapter was unloaded)."""
        with self._lock:
            for k in [k for k in self._entries if k[0] == serial]:
                self.bytes -= self._entries.pop(k).nbytes

    def __len__(self) -> int:
        return len(self._entries)
