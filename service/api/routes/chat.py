"""POST /v1/chat/completions."""

import random

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from service.api import completions
from service.api.answer_log import answer_logger
from service.api.deps import ChatCaller, ReadyDep, with_body_model
from service.api.schemas import ChatCompletion, ChatCompletionRequest, chat_request_model
from service.errors import APIError
from service.serving import arena
from service.serving.adapters import PRODUCTION_MODEL, UnknownModel
from service.settings import Settings

ADAPTER_HEADER = "X-Chatloop-Adapter"
RNG = random.Random()


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
        if body.model == PRODUCTION_MODEL:  # a share of the traffic answers a running A/B test, blind
            pair = await arena.ab_answerers(state.adapters, adapter, body.n, state.settings.ab_share, RNG)
            if pair is not None:
                adapter = arena.AB_LABEL
    # Validate (template, tokenise: off the event loop) before loading any adapter a request names: a bad
    # request must cost no merge. The caller's identity goes with it, for the engine's per-caller limits.
    prepared = await completions.prepare_async(body, adapter, state.base.tokenizer, state.settings,
                                               state.engine.max_context, owner=caller.limiter_id,
                                               grammars=state.engine.grammars)
    for version in pair or [adapter]:
        await state.adapters.ensure_loaded(version)
    prepared.choice_adapters = pair
    log_answer = answer_logger(state, prepared, body, adapter, caller.principal, blind=pair is not None)
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


def routes(settings: Settings) -> APIRouter:
    """The chat route, its body carrying this deployment's limits (schemas.chat_request_model)."""
    router = APIRouter(prefix="/v1", tags=["chat"])
    endpoint = with_body_model(chat_completions, chat_request_model(settings))
    router.add_api_route("/chat/completions", endpoint, methods=["POST"], response_model=None)
    return router
