"""FastAPI dependencies, as Annotated aliases."""

from typing import Annotated

from fastapi import Depends, Request

from service.errors import APIError
from service.settings import Settings
from service.state import AppState


def get_state(request: Request) -> AppState:
    return request.app.state.chatloop


def get_ready_state(state: Annotated[AppState, Depends(get_state)]) -> AppState:
    if not state.ready:
        reason = state.error or "the model is still loading"
        raise APIError(503, f"not ready: {reason}", code="not_ready")
    return state


def get_settings(state: Annotated[AppState, Depends(get_state)]) -> Settings:
    return state.settings


StateDep = Annotated[AppState, Depends(get_state)]
ReadyDep = Annotated[AppState, Depends(get_ready_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
