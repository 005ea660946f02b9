"""Training data from logged feedback: preference pairs, pointwise thumbs and a prompt pool.

Input is what `chatloop feedback export` writes (common/records.py). Train and held-out sides are split by
the conversation's id, so a prompt never lands on both.
"""

from dataclasses import dataclass, field
from typing import NamedTuple

from common.conversations import Messages, conversation_id, is_heldout
from common.records import Origin, Pair, Thumb


class Served(NamedTuple):
    """An answer the service served: a sample of the version that wrote it, with what its user said of it."""

    prompt: Messages
    text: str
    ended: bool  # it stopped at EOS (else at the token limit)
    vote: float  # +1 chosen in a comparison or thumbed up, -1 rejected or thumbed down
    on_policy: bool = True  # written by the version being trained (else by another version: production earlier, a
    # candidate in an A/B test)


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

    def served(self, version: str, temperature: float, limit: int, thumbs: bool = True) -> list[Served]:
        """Up to `limit` distinct training-side answers served at this temperature with no nucleus cut (top_p 1),
        each with its newest vote: the newest that `version` served (exact samples of it at the trainer's own
        sampling settings) and, when they are fewer than `limit`, the newest that other versions served. Those are
        samples of a neighbouring policy (the production before it, a candidate in an A/B test against it) that
        their users judged all the same: a run that starts right after a promotion would otherwise train on the
        handful of answers the new production wrote while it was a candidate (12 in one benchmark run).
        thumbs=False: the answers of comparisons only. Newest last."""

        def sampled_as_trained(origin: Origin) -> bool:
            return (origin.adapter is not None and origin.temperature == temperature and origin.top_p in (None, 1.0)
                    and origin.finish_reason in ("stop", "length"))

        found: dict[tuple, Served] = {}
        answers = [(p.created or 0, p.prompt, text, origin, vote) for p in self.pairs
                   for text, origin, vote in zip((p.chosen, p.rejected), p.origins, (1.0, -1.0), strict=True)]
        if thumbs:
            answers += [(t.created or 0, t.prompt, t.answer, t.origin, 1.0 if t.label else -1.0) for t in self.thumbs]
        for _, prompt, text, origin, vote in sorted(answers, key=lambda a: a[0]):  # oldest vote first: newest wins
            if sampled_as_trained(origin):
                key = (conversation_id(prompt), text)
                found.pop(key, None)
                found[key] = Served(prompt, text, origin.finish_reason == "stop", vote, origin.adapter == version)
        if not limit:
            return []
        own = [s for s in found.values() if s.on_policy][-limit:]
        room = limit - len(own)
        others = [s for s in found.values() if not s.on_policy][-room:] if room else []
        return [*others, *own]


def unique_prompts(items: list[Pair | Thumb] | list[Served]) -> list[Messages]:
    """Each conversation once, in a fixed order (by its id)."""
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
