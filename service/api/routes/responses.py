"""POST /v1/responses: the Responses API, answered on the chat path (service/api/responses.py translates)."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from service.api import completions
from service.api.answer_log import answer_logger
from service.api.deps import ChatCaller, ReadyDep
from service.api.responses import ResponseBuilder, ResponsesRequest, from_chat, new_ids, stream_events
from service.api.routes.chat import ADAPTER_HEADER, RNG
from service.errors import APIError
from service.serving import arena
from service.serving.adapters import PRODUCTION_MODEL, UnknownModel

CHAT_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens"}
router = APIRouter(prefix="/v1", tags=["responses"])


@router.post("/responses", response_model=None)
async def create_response(
    body: ResponsesRequest, http: Request, state: ReadyDep, caller: ChatCaller
) -> JSONResponse | StreamingResponse | Response:
    if body.model == arena.ARENA_MODEL:
        raise APIError(400, "the arena answers with two choices: ask it through /v1/chat/completions", "model")
    try:
        adapter = await state.adapters.adapter_for(body.model)
    except UnknownModel:
        raise APIError(404, f"The model '{body.model}' does not exist", "model", "model_not_found") from None
    versions = None
    if body.model == PRODUCTION_MODEL:  # one answer, as in chat completions: a running A/B test's, blind
        versions = await arena.ab_answerers(state.adapters, adapter, 1, state.settings.ab_share, RNG)
        adapter = arena.AB_LABEL if versions else adapter
    if versions is None:
        await state.adapters.ensure_loaded(adapter)
    chat = body.chat_request()
    try:
        prepared = await completions.prepare_async(
            chat, adapter, state.base.tokenizer, state.settings, state.engine.max_context, owner=caller.limiter_id,
            grammars=state.engine.grammars)
    except APIError as exc:  # named in the chat request's terms: say them in this one's
        exc.param = CHAT_PARAMS.get(exc.param, exc.param)
        raise
    response_id, message_id = new_ids()
    prepared.id = response_id  # the completion log (and so feedback) knows the answer by its response id
    prepared.choice_adapters = versions
    builder = ResponseBuilder(body, response_id, message_id, prepared.created)
    log_answer = answer_logger(state, prepared, chat, adapter, caller.principal, blind=versions is not None)
    request = completions.submit(state.engine, prepared)
    headers = {ADAPTER_HEADER: adapter}
    if body.stream:
        chunks = completions.stream_chunks(request, prepared, True, log_answer)
        return StreamingResponse(stream_events(builder, chunks), media_type="text/event-stream", headers=headers)
    result = await completions.complete_unless_disconnected(request, prepared, log_answer, http.is_disconnected)
    if result is None:  # the client left; nobody will read a body
        return Response(status_code=499)
    return JSONResponse(from_chat(builder, result), headers=headers)
