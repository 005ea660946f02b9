"""POST /v1/chat/completions."""

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from service import completions
from service.adapters import UnknownModel
from service.deps import ReadyDep
from service.errors import APIError
from service.schemas import ChatCompletion, ChatCompletionRequest

router = APIRouter(prefix="/v1", tags=["chat"])
ADAPTER_HEADER = "X-Chatloop-Adapter"


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, http: Request, response: Response, state: ReadyDep
) -> ChatCompletion | StreamingResponse | Response:
    try:
        adapter = state.adapters.adapter_for(body.model)
    except UnknownModel:
        raise APIError(404, f"The model '{body.model}' does not exist", "model", "model_not_found") from None
    await state.adapters.ensure_loaded(adapter)
    prepared = completions.prepare(body, adapter, state.base.tokenizer, state.settings, state.engine.max_context)
    request = completions.submit(state.engine, prepared)
    headers = {ADAPTER_HEADER: adapter}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = completions.stream_chunks(request, prepared, include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)
    result = await completions.complete_unless_disconnected(request, prepared, http.is_disconnected)
    if result is None:  # the client left; nobody will read a body
        return Response(status_code=499)
    response.headers.update(headers)
    return result
