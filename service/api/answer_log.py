"""Logging an answer in the completion log, the same way whichever route gave it (chat completions, the Responses
API), so that /v1/feedback and /v1/comparisons can rate it by its id."""

import logging

from service.api.completions import OnDone, Prepared
from service.api.schemas import ChatCompletionRequest
from service.serving.state import AppState
from service.store.completion_log import CompletionRecord, LoggedChoice, log_completion

log = logging.getLogger(__name__)
# The sampling parameters that produced the answers. The stop strings themselves are left out: the caller's
# own text (up to CHATLOOP_MAX_STOP x CHATLOOP_MAX_STOP_CHARS characters), kept for 7 days and for good once
# rated, that no reader of the record uses; their number says what a reader needs, that an answer ending in
# "stop" may have ended at a caller's stop string rather than at the model's end of turn.
LOGGED_PARAMS = {"temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "n"}


def logged_params(body: ChatCompletionRequest) -> dict:
    return body.model_dump(include=LOGGED_PARAMS) | {"stop_strings": len(body.stop)}


def answer_logger(
    state: AppState, prepared: Prepared, body: ChatCompletionRequest, adapter: str, owner: str, blind: bool = False,
) -> OnDone:
    """What the completion functions call with the finished choices: one CompletionRecord under `prepared.id`."""

    async def log_answer(choices: list[LoggedChoice]) -> None:
        record = CompletionRecord.build(
            prepared.messages, id=prepared.id, created=prepared.created, model=prepared.model, adapter=adapter,
            choices=choices, params=logged_params(body), user=body.user, owner=owner, blind=blind,
        )
        try:
            await log_completion(state.redis, record, state.settings.completion_ttl_s)
        except Exception:  # the answer still goes out; losing its log is bad, refusing the user is worse
            log.exception("could not log completion %s", prepared.id)

    return log_answer
