"""Rankings as (preferred, rejected) pairs of answer indexes."""

from itertools import combinations


def ranking_to_pairs(ranking: list[int]) -> list[tuple[int, int]]:
    """A ranking (best first) of k answers as its k(k-1)/2 (preferred, rejected) pairs."""
    return list(combinations(ranking, 2))


def preferred_to_pairs(preferred: int, k: int) -> list[tuple[int, int]]:
    """One answer picked out of k: it beats each of the others; the others stay unordered."""
    return [(preferred, other) for other in range(k) if other != preferred]
