"""FastAPI dependencies, as Annotated aliases, and request bodies typed per deployment."""

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Header, Request
from redis.asyncio import Redis

from service.api.auth import Caller, enforce_rate_limit, identify, refuse_admin_from_widget, require_admin
from service.api.hosts import straight_from_this_machine
from service.api.widget_cors import parse_origins
from service.errors import APIError
from service.serving.state import AppState
from service.settings import Settings


def get_state(request: Request) -> AppState:
    return request.app.state.chatloop


def get_ready_state(state: Annotated[AppState, Depends(get_state)]) -> AppState:
    if not state.ready:
        reason = state.error or "the model is still loading"
        raise APIError(503, f"not ready: {reason}", code="not_ready")
    return state


def get_settings(state: Annotated[AppState, Depends(get_state)]) -> Settings:
    return state.settings


def get_redis(state: Annotated[AppState, Depends(get_state)]) -> Redis:
    return state.redis


StateDep = Annotated[AppState, Depends(get_state)]
ReadyDep = Annotated[AppState, Depends(get_ready_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]


async def get_caller(
    request: Request, redis: RedisDep, settings: SettingsDep, authorization: Annotated[str | None, Header()] = None
) -> Caller:
    address = request.client.host if request.client else ""
    direct = straight_from_this_machine(request.headers)
    caller = await identify(redis, authorization, address, settings.anonymous, direct)
    refuse_admin_from_widget(caller, request.headers.get("origin"), parse_origins(settings.widget_origins))
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


def rate_limited(route: str, setting: str):
    """A dependency that identifies the caller and counts the request against its per-minute limit."""

    async def dependency(caller: CallerDep, redis: RedisDep, settings: SettingsDep) -> Caller:
        await enforce_rate_limit(redis, caller, route, getattr(settings, setting))
        return caller

    return dependency


async def get_admin(caller: CallerDep) -> Caller:
    return require_admin(caller)


ChatCaller = Annotated[Caller, Depends(rate_limited("chat", "chat_requests_per_minute"))]
FeedbackCaller = Annotated[Caller, Depends(rate_limited("feedback", "feedback_requests_per_minute"))]
AdminCaller = Annotated[Caller, Depends(get_admin)]


def with_body_model(endpoint: Callable[..., Awaitable], model: type) -> Callable[..., Awaitable]:
    """`endpoint` with its `body` parameter typed as `model`: a request model built from the settings (schemas.py),
    so that one app's limits are both what FastAPI validates and what /openapi.json says."""

    @functools.wraps(endpoint)
    async def bound(*args, **kwargs):
        return await endpoint(*args, **kwargs)

    signature = inspect.signature(endpoint, eval_str=True)
    params = [p.replace(annotation=model) if p.name == "body" else p for p in signature.parameters.values()]
    bound.__signature__ = signature.replace(parameters=params)
    return bound
