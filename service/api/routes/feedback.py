"""POST /v1/feedback (thumbs), POST /v1/comparisons, GET /v1/feedback/stats."""

from fastapi import APIRouter
from pydantic import BaseModel
from redis.asyncio import Redis

from service.api import metrics
from service.api.deps import FeedbackCaller, RedisDep, SettingsDep, with_body_model
from service.api.feedback_bodies import (
    ComparisonRequest,
    ThumbRequest,
    answer,
    check_owner,
    comparison_event,
    comparison_request_model,
    thumb_event,
    thumb_request_model,
)
from service.errors import APIError
from service.feedback.events import FeedbackEvent
from service.settings import Settings
from service.store import feedback_store
from service.store.completion_log import CompletionRecord, get_completion


class FeedbackReceipt(BaseModel):
    id: str  # the stream event id
    status: str  # recorded | replaced | unchanged
    pairs: int = 0
    adapters: list[str] | None = None  # which version wrote each compared (or blind) answer, revealed after the vote


async def _record(redis: Redis, completion_id: str, param: str = "completion_id") -> CompletionRecord:
    record = await get_completion(redis, completion_id)
    if record is None:
        raise APIError(404, f"no completion {completion_id!r} (unknown or expired)", param, "completion_not_found")
    return record


async def _cast(redis: Redis, event: FeedbackEvent) -> FeedbackReceipt:
    try:
        status, event_id = await feedback_store.cast_vote(redis, event)
    except feedback_store.CompletionGone:
        raise APIError(404, "a completion expired while recording the vote", "completion_id",
                       "completion_not_found") from None
    metrics.FEEDBACK.labels(event.kind, status).inc()
    adapters = [a.adapter for a in event.answers] if event.kind == "comparison" or event.blind else None
    return FeedbackReceipt(id=event_id, status=status, pairs=event.pair_count(), adapters=adapters)


async def thumbs(body: ThumbRequest, caller: FeedbackCaller, redis: RedisDep) -> FeedbackReceipt:
    record = await _record(redis, body.completion_id)
    check_owner(caller, record)
    return await _cast(redis, thumb_event(body, record, caller))


async def comparisons(
    body: ComparisonRequest, caller: FeedbackCaller, redis: RedisDep, settings: SettingsDep
) -> FeedbackReceipt:
    if body.completion_id is not None:
        record = await _record(redis, body.completion_id)
        records = [record] * len(record.choices)
        answers = [answer(record, i, "completion_id") for i in range(len(record.choices))]
    else:
        records = [await _record(redis, a.completion_id, f"answers.{i}") for i, a in enumerate(body.answers)]
        pairs = enumerate(zip(records, body.answers, strict=True))
        answers = [answer(r, a.choice_index, f"answers.{i}.choice_index") for i, (r, a) in pairs]
    for record in records:
        check_owner(caller, record)
    return await _cast(redis, comparison_event(body, records, answers, caller, settings.max_n))


async def feedback_stats(caller: FeedbackCaller, redis: RedisDep) -> dict[str, int]:
    return await feedback_store.stats(redis)


def routes(settings: Settings) -> APIRouter:
    """The feedback routes, their bodies carrying this deployment's limits (feedback_bodies.py)."""
    router = APIRouter(prefix="/v1", tags=["feedback"])
    router.add_api_route("/feedback", with_body_model(thumbs, thumb_request_model(settings)), methods=["POST"])
    router.add_api_route(
        "/comparisons", with_body_model(comparisons, comparison_request_model(settings)), methods=["POST"]
    )
    router.add_api_route("/feedback/stats", feedback_stats, methods=["GET"])
    return router
