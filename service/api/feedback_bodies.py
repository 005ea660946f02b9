"""Bodies of the feedback routes, and turning a valid one into a FeedbackEvent.

As with the chat body, a deployment's limits (answers per comparison, comment length) are part of the
request models (`thumb_request_model`, `comparison_request_model`), so /openapi.json says what is accepted.
"""

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from service.api.auth import Caller
from service.errors import APIError
from service.feedback.events import AnswerRef, FeedbackEvent
from service.settings import Settings
from service.store.completion_log import CompletionRecord

Verdict = Literal["tie", "both_bad", "both bad"]
User = Annotated[str, Field(max_length=256)]


class ThumbRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    completion_id: str
    choice_index: Annotated[int, Field(ge=0)] = 0
    rating: Literal[1, -1, "up", "down"]
    comment: str | None = None
    user: User | None = None

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

    # The schema says "exactly one of each pair", as _one_of_each does (null stays out of the schema: it
    # means the same as leaving the field out).
    model_config = ConfigDict(extra="forbid", json_schema_extra={"allOf": [
        {"oneOf": [{"required": ["completion_id"]}, {"required": ["answers"]}]},
        {"oneOf": [{"required": ["preferred"]}, {"required": ["ranking"]}]},
    ]})

    completion_id: str | SkipJsonSchema[None] = None
    answers: Annotated[list[AnswerSelector], Field(min_length=2)] | SkipJsonSchema[None] = None
    preferred: Annotated[int, Field(ge=0)] | Verdict | SkipJsonSchema[None] = None
    ranking: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2)] | SkipJsonSchema[None] = None
    comment: str | None = None
    user: User | None = None

    @field_validator("preferred")
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


def thumb_request_model(settings: Settings) -> type[ThumbRequest]:
    """The thumb body with this deployment's comment limit."""
    return create_model(
        "ThumbRequest", __base__=ThumbRequest,
        comment=(Annotated[str, Field(max_length=settings.max_comment_chars)] | None, None),
    )


def comparison_request_model(settings: Settings) -> type[ComparisonRequest]:
    """The comparison body with this deployment's limits: at most CHATLOOP_MAX_N answers (a ranking of k answers
    is k(k-1)/2 training pairs, so the count is what bounds one vote's weight) and the comment limit.

    Answers and ranking entries are distinct; comparison_event refuses repeats (with the completion in hand, it
    also knows {"completion_id": c} and {"completion_id": c, "choice_index": 0} for the same answer)."""
    k = settings.max_n
    index = Annotated[int, Field(ge=0, le=k - 1)]
    distinct = {"uniqueItems": True}
    return create_model(
        "ComparisonRequest", __base__=ComparisonRequest,
        answers=(Annotated[list[AnswerSelector], Field(min_length=2, max_length=k, json_schema_extra=distinct)]
                 | SkipJsonSchema[None], None),
        preferred=(index | Verdict | SkipJsonSchema[None], None),
        ranking=(Annotated[list[index], Field(min_length=2, max_length=k, json_schema_extra=distinct)]
                 | SkipJsonSchema[None], None),
        comment=(Annotated[str, Field(max_length=settings.max_comment_chars)] | None, None),
    )


def _unprocessable(message: str, param: str) -> APIError:
    return APIError(422, message, param, "invalid_feedback")


def check_owner(caller: Caller, record: CompletionRecord) -> None:
    if caller.role != "admin" and record.owner != caller.principal:
        raise APIError(403, f"completion {record.id} belongs to another caller", "completion_id", "not_owner")


def answer(record: CompletionRecord, index: int, param: str) -> AnswerRef:
    if index >= len(record.choices):
        raise _unprocessable(f"completion {record.id} has {len(record.choices)} choice(s); no index {index}", param)
    choice = record.choices[index]
    return AnswerRef(
        completion_id=record.id, choice_index=index, text=choice.text, adapter=choice.adapter or record.adapter,
        finish_reason=choice.finish_reason, temperature=record.params.get("temperature"),
        top_p=record.params.get("top_p"),
    )


def thumb_event(body: ThumbRequest, record: CompletionRecord, caller: Caller) -> FeedbackEvent:
    """The voter is the authenticated caller alone ('key:<id>' or 'anonymous'): one counted vote per caller and
    answer, whatever `user` the client names (a string the client makes up would otherwise mint a voter per
    request). The end user it names is kept on the event for the record."""
    return FeedbackEvent(
        kind="thumb", created=int(time.time()), voter=caller.principal, user=body.user or record.user,
        prompt=record.messages, conversation=record.conversation,
        answers=[answer(record, body.choice_index, "choice_index")], rating=body.score, comment=body.comment,
        blind=record.blind,  # served without its version: an A/B test outcome when production or its candidate wrote it
    )


def comparison_event(
    body: ComparisonRequest, records: list[CompletionRecord], answers: list[AnswerRef], caller: Caller,
    max_answers: int,
) -> FeedbackEvent:
    k = len(answers)
    if k < 2:
        raise _unprocessable("a comparison needs at least two answers", "answers")
    if k > max_answers:  # the body's schema caps `answers`; this is a completion logged before a lower CHATLOOP_MAX_N
        raise _unprocessable(f"a comparison takes at most {max_answers} answers; this one has {k}", "answers")
    if len({(a.completion_id, a.choice_index) for a in answers}) < k:
        raise _unprocessable("the same answer appears twice", "answers")
    if len({r.conversation for r in records}) > 1:
        raise _unprocessable("the answers reply to different conversations", "answers")
    if isinstance(body.preferred, int) and not 0 <= body.preferred < k:
        raise _unprocessable(f"preferred must be an index below {k}", "preferred")
    if body.ranking is not None and sorted(body.ranking) != list(range(k)):
        raise _unprocessable(f"ranking must order all {k} answers: a permutation of 0..{k - 1}", "ranking")
    return FeedbackEvent(
        kind="comparison", created=int(time.time()), voter=caller.principal, user=body.user or records[0].user,
        prompt=records[0].messages, conversation=records[0].conversation, answers=answers,
        ranking=body.ranking, preferred=body.preferred if isinstance(body.preferred, int) else None,
        verdict=body.preferred if isinstance(body.preferred, str) else None, comment=body.comment,
        blind=all(r.blind for r in records),  # served without their versions: an arena or A/B test outcome
    )
