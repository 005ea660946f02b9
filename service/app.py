"""The FastAPI application: routes, error handlers and the lifespan that loads the model."""

from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.body_limit import BodyLimitMiddleware
from service.errors import install_error_handlers
from service.logs import RequestIdMiddleware
from service.metrics import MetricsMiddleware
from service.routes import admin, chat, feedback, health, metrics, models, web
from service.settings import Settings, get_settings
from service.state import AppState


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    state = AppState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start_loading()
        yield
        await state.close()

    app = FastAPI(title="chatloop", version="0.1.0", lifespan=lifespan)
    app.state.chatloop = state
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)  # added last: outermost, so every log line has the id
    for module in (health, metrics, models, chat, feedback, admin, web):
        app.include_router(module.router)
    return app
