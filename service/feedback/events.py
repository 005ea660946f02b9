"""The feedback event: what a trainer reads. Self-contained (prompt and answer texts included)."""

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from service.feedback.rankings import preferred_to_pairs, ranking_to_pairs


class AnswerRef(BaseModel):
    completion_id: str
    choice_index: int = 0
    text: str = ""
    adapter: str = ""
    finish_reason: str | None = None
    # How it was sampled: the trainer uses served answers as rollouts only when they match its own sampling.
    temperature: float | None = None
    top_p: float | None = None


class FeedbackEvent(BaseModel):
    kind: Literal["thumb", "comparison"]
    created: int
    voter: str  # who voted: the authenticated caller, "key:<id>" or "anonymous"
    user: str | None = None  # the end user the client named (the OpenAI `user` field): kept, never a voter of its own
    prompt: list[dict]  # the conversation the answers reply to
    conversation: str
    answers: list[AnswerRef] = Field(min_length=1)
    rating: Literal[1, -1] | None = None  # thumbs
    ranking: list[int] | None = None  # comparisons: indexes into answers, best first
    preferred: int | None = None  # comparisons: the one answer picked
    verdict: Literal["tie", "both_bad"] | None = None  # comparisons with no winner
    comment: str | None = None
    source: str = "api"
    blind: bool = False  # the answers were served without their versions (the arena, an A/B test)

    @model_validator(mode="after")
    def _consistent(self) -> "FeedbackEvent":
        if self.kind == "thumb":
            if self.rating is None or len(self.answers) != 1:
                raise ValueError("a thumb rates exactly one answer")
        elif sum(x is not None for x in (self.ranking, self.preferred, self.verdict)) != 1:
            raise ValueError("a comparison has exactly one of ranking, preferred or verdict")
        return self

    @property
    def vote_key(self) -> str:
        """Who voted on what: a second vote with the same key replaces the first."""
        targets = sorted(f"{a.completion_id}:{a.choice_index}" for a in self.answers)
        return hashlib.sha256(f"{self.kind}|{self.voter}|{'|'.join(targets)}".encode()).hexdigest()[:40]

    def fingerprint(self) -> str:
        """What the vote says; the same vote cast twice is recognised and ignored."""
        return json.dumps([self.rating, self.ranking, self.preferred, self.verdict, self.comment])

    def pairs(self) -> list[tuple[int, int]]:
        """(preferred, rejected) answer indexes this event implies."""
        if self.ranking is not None:
            return ranking_to_pairs(self.ranking)
        if self.preferred is not None:
            return preferred_to_pairs(self.preferred, len(self.answers))
        return []

    def pair_count(self) -> int:
        """How many pairs pairs() gives, counted rather than listed: a ranking of k answers k(k-1)/2, one pick out
        of k k-1, a verdict none."""
        k = len(self.answers)
        if self.ranking is not None:
            return k * (k - 1) // 2
        return k - 1 if self.preferred is not None else 0

    def counts(self) -> dict[str, int]:
        """This vote's contribution to the stats counters."""
        if self.kind == "thumb":
            return {"thumbs_up" if self.rating == 1 else "thumbs_down": 1}
        counts = {"comparisons": 1, "pairs": self.pair_count()}
        if self.verdict is not None:
            counts[{"tie": "ties", "both_bad": "both_bad"}[self.verdict]] = 1
        return counts

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)

    @classmethod
    def from_json(cls, raw: str) -> "FeedbackEvent":
        return cls.model_validate_json(raw)
