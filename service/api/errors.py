"""Every error leaves the API in OpenAI's shape, with the right status code (service/errors.py has the shape)."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.schemas import MESSAGE_ROLES
from service.api.unsupported import UNSUPPORTED
from service.errors import APIError, error_body

log = logging.getLogger(__name__)

OPENAI_ROUTES = {"/v1/chat/completions", "/v1/responses", "/v1/models"}


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


# pydantic names the union member that failed in the error's location ("list[constrained-str]", "str"), which
# is no parameter of the API: the parameter is the location up to there.
_UNION_LABELS = {"str", "int", "float", "bool"}


def _param(loc: tuple) -> str | None:
    parts = []
    for part in loc:
        if isinstance(part, str) and (not part.isidentifier() or part in _UNION_LABELS):
            break
        parts.append(str(part))
    return ".".join(parts) or None


def _without_role_tags(loc: tuple) -> tuple:
    """pydantic puts the message's role (the union's tag) after its index: messages.0.user.content; the field is
    messages.0.content."""
    return tuple(p for i, p in enumerate(loc) if not (p in MESSAGE_ROLES and i and isinstance(loc[i - 1], int)))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    # A union reports every member's complaint; "should be a valid list" about a string says nothing, so a
    # field chatloop does not support says so first, then a complaint about the value itself.
    first = next((e for e in errors if e.get("type") == UNSUPPORTED),
                 next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0]))
    loc = _without_role_tags(tuple(p for p in first.get("loc", ()) if p != "body"))
    if first.get("type") in ("union_tag_invalid", "union_tag_not_found"):  # a message of no known role
        loc = (*loc, "role")
    param = _param(loc)
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    if first.get("type") == "extra_forbidden":  # OpenAI's words for it; the name itself may be no identifier
        name = ".".join(str(p) for p in loc if p not in _UNION_LABELS and "[" not in str(p))
        return f"Unrecognized request argument supplied: {name}", name
    message = first.get("msg", "invalid request")
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI's own routes answer malformed requests with 400 (as OpenAI and vLLM do); chatloop's
        # own routes (feedback, comparisons, admin) keep FastAPI's 422.
        status = 400 if request.url.path in OPENAI_ROUTES else 422
        message, param = _validation_message(exc)
        return error_response(status, message, param, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)  # 405 keeps its Allow

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal server error")
