"""Training data from logged feedback: preference pairs, pointwise thumbs and a prompt pool.

Input is what `chatloop feedback export` writes (common/records.py). Train and held-out sides are split by
the conversation's id, so a prompt never lands on both.
"""

from dataclasses import dataclass, field

from common.conversations import Messages, conversation_id, is_heldout
from common.records import Pair, Thumb


@dataclass
class FeedbackData:
    pairs: list[Pair] = field(default_factory=list)
    thumbs: list[Thumb] = field(default_factory=list)
    heldout_pairs: list[Pair] = field(default_factory=list)
    heldout_thumbs: list[Thumb] = field(default_factory=list)

    @property
    def prompts(self) -> list[Messages]:
        """Unique training-side prompts: the conversations users actually sent (PPO's prompt pool)."""
        return unique_prompts([*self.pairs, *self.thumbs])

    @property
    def heldout_prompts(self) -> list[Messages]:
        return unique_prompts([*self.heldout_pairs, *self.heldout_thumbs])


def unique_prompts(items: list[Pair | Thumb]) -> list[Messages]:
    seen: dict[str, Messages] = {}
    for item in items:
        seen.setdefault(conversation_id(item.prompt), item.prompt)
    return [seen[k] for k in sorted(seen)]


def build_datasets(items: list[Pair | Thumb], heldout_fraction: float = 0.1) -> FeedbackData:
    """Deduplicate, drop pairs that prefer an answer to itself, and split by prompt."""
    data = FeedbackData()
    seen = set()
    for item in items:
        key = item.key()
        if key in seen or (isinstance(item, Pair) and item.chosen == item.rejected):
            continue
        seen.add(key)
        heldout = is_heldout(item.prompt, heldout_fraction)
        if isinstance(item, Pair):
            (data.heldout_pairs if heldout else data.pairs).append(item)
        else:
            (data.heldout_thumbs if heldout else data.thumbs).append(item)
    return data
