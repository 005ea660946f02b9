"""Pure helpers for comparisons: which conversation an answer belongs to, and rankings as pairs."""

import hashlib
import json
from itertools import combinations


def conversation_hash(messages: list[dict]) -> str:
    """A stable id for a conversation: answers to the same one can be compared with each other."""
    canonical = [{"role": m["role"], "content": m["content"]} for m in messages]
    blob = json.dumps(canonical, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def ranking_to_pairs(ranking: list[int]) -> list[tuple[int, int]]:
    """A ranking (best first) of k answers as its k(k-1)/2 (preferred, rejected) pairs."""
    return list(combinations(ranking, 2))


def preferred_to_pairs(preferred: int, k: int) -> list[tuple[int, int]]:
    """One answer picked out of k: it beats each of the others; the others stay unordered."""
    return [(preferred, other) for other in range(k) if other != preferred]
