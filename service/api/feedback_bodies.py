"""Bodies of the feedback routes, and turning a valid one into a FeedbackEvent."""

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.api.auth import Caller
from service.errors import APIError
from service.feedback.events import AnswerRef, FeedbackEvent
from service.store.completion_log import CompletionRecord

Verdict = Literal["tie", "both_bad"]


class ThumbRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    completion_id: str
    choice_index: Annotated[int, Field(ge=0)] = 0
    rating: Literal[1, -1, "up", "down"]
    comment: str | None = None
    user: Annotated[str, Field(max_length=256)] | None = None

    @property
    def score(self) -> Literal[1, -1]:
        return 1 if self.rating in (1, "up") else -1


class AnswerSelector(BaseModel):
    model_config = ConfigDict(extra="forbid")

    completion_id: str
    choice_index: Annotated[int, Field(ge=0)] = 0


class ComparisonRequest(BaseModel):
    """Either all choices of one completion (`completion_id`, asked with n >= 2) or `answers` from several
    completions of the same conversation; then `preferred` (an index, "tie" or "both bad") or a full
    `ranking` (indexes, best first)."""

    model_config = ConfigDict(extra="forbid")

    completion_id: str | None = None
    answers: list[AnswerSelector] | None = None
    preferred: int | Verdict | None = None
    ranking: list[int] | None = None
    comment: str | None = None
    user: Annotated[str, Field(max_length=256)] | None = None

    @field_validator("preferred", mode="before")
    @classmethod
    def _spelling(cls, v):
        return "both_bad" if v == "both bad" else v

    @model_validator(mode="after")
    def _one_of_each(self) -> "ComparisonRequest":
        if (self.completion_id is None) == (self.answers is None):
            raise ValueError("give either completion_id or answers")
        if (self.preferred is None) == (self.ranking is None):
            raise ValueError("give either preferred or ranking")
        return self


def _unprocessable(message: str, param: str) -> APIError:
    return APIError(422, message, param, "invalid_feedback")


def check_comment(comment: str | None, limit: int) -> None:
    if comment is not None and len(comment) > limit:
        raise _unprocessable(f"comment is {len(comment)} characters; the limit is {limit}", "comment")


def check_owner(caller: Caller, record: CompletionRecord) -> None:
    if caller.role != "admin" and record.owner != caller.principal:
        raise APIError(403, f"completion {record.id} belongs to another caller", "completion_id", "not_owner")


def answer(record: CompletionRecord, index: int, param: str) -> AnswerRef:
    if index >= len(record.choices):
        raise _unprocessable(f"completion {record.id} has {len(record.choices)} choice(s); no index {index}", param)
    choice = record.choices[index]
    return AnswerRef(
        completion_id=record.id, choice_index=index, text=choice.text, adapter=choice.adapter or record.adapter,
        finish_reason=choice.finish_reason,
    )


def voter(caller: Caller, user: str | None) -> str:
    return f"{caller.principal}/{user}" if user else caller.principal


def thumb_event(body: ThumbRequest, record: CompletionRecord, caller: Caller) -> FeedbackEvent:
    return FeedbackEvent(
        kind="thumb", created=int(time.time()), voter=voter(caller, body.user or record.user),
        prompt=record.messages, conversation=record.conversation,
        answers=[answer(record, body.choice_index, "choice_index")], rating=body.score, comment=body.comment,
    )


def comparison_event(
    body: ComparisonRequest, records: list[CompletionRecord], answers: list[AnswerRef], caller: Caller
) -> FeedbackEvent:
    k = len(answers)
    if k < 2:
        raise _unprocessable("a comparison needs at least two answers", "answers")
    if len({(a.completion_id, a.choice_index) for a in answers}) < k:
        raise _unprocessable("the same answer appears twice", "answers")
    if len({r.conversation for r in records}) > 1:
        raise _unprocessable("the answers reply to different conversations", "answers")
    if isinstance(body.preferred, int) and not 0 <= body.preferred < k:
        raise _unprocessable(f"preferred must be an index below {k}", "preferred")
    if body.ranking is not None and sorted(body.ranking) != list(range(k)):
        raise _unprocessable(f"ranking must order all {k} answers: a permutation of 0..{k - 1}", "ranking")
    return FeedbackEvent(
        kind="comparison", created=int(time.time()), voter=voter(caller, body.user or records[0].user),
        prompt=records[0].messages, conversation=records[0].conversation, answers=answers,
        ranking=body.ranking, preferred=body.preferred if isinstance(body.preferred, int) else None,
        verdict=body.preferred if isinstance(body.preferred, str) else None, comment=body.comment,
    )
