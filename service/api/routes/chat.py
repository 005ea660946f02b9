"""POST /v1/chat/completions."""

import logging
import random

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from service.api import completions
from service.api.deps import ChatCaller, ReadyDep
from service.api.schemas import ChatCompletion, ChatCompletionRequest
from service.errors import APIError
from service.serving import arena
from service.serving.adapters import UnknownModel
from service.store.completion_log import CompletionRecord, LoggedChoice, log_completion

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["chat"])
ADAPTER_HEADER = "X-Chatloop-Adapter"
RNG = random.Random()
LOGGED_PARAMS = {"temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "n"}


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, http: Request, response: Response, state: ReadyDep, caller: ChatCaller
) -> ChatCompletion | StreamingResponse | Response:
    pair = None
    if body.model == arena.ARENA_MODEL:
        if body.n > 2:
            raise APIError(400, "the arena answers with exactly two choices", "n")
        pair, adapter = await arena.pick_pair(state.redis, state.adapters.production, RNG), arena.LABEL
        body = body.model_copy(update={"n": 2})
    else:
        try:
            adapter = await state.adapters.adapter_for(body.model)
        except UnknownModel:
            raise APIError(404, f"The model '{body.model}' does not exist", "model", "model_not_found") from None
    for version in pair or [adapter]:
        await state.adapters.ensure_loaded(version)
    prepared = completions.prepare(body, adapter, state.base.tokenizer, state.settings, state.engine.max_context)
    prepared.choice_adapters = pair

    async def log_answer(choices: list[LoggedChoice]) -> None:
        record = CompletionRecord.build(
            prepared.messages, id=prepared.id, created=prepared.created, model=prepared.model, adapter=adapter,
            choices=choices, params=body.model_dump(include=LOGGED_PARAMS), user=body.user, owner=caller.principal,
        )
        try:
            await log_completion(state.redis, record, state.settings.completion_ttl_s)
        except Exception:  # the answer still goes out; losing its log is bad, refusing the user is worse
            log.exception("could not log completion %s", prepared.id)

    request = completions.submit(state.engine, prepared)
    headers = {ADAPTER_HEADER: adapter}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = completions.stream_chunks(request, prepared, include_usage, log_answer)
        return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)
    result = await completions.complete_unless_disconnected(request, prepared, log_answer, http.is_disconnected)
    if result is None:  # the client left; nobody will read a body
        return Response(status_code=499)
    response.headers.update(headers)
    return result
