"""The FastAPI application: routes, error handlers and the lifespan that loads the model."""

from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api.errors import install_error_handlers
from service.api.hosts import HostCheckMiddleware
from service.api.logs import RequestIdMiddleware
from service.api.metrics import MetricsMiddleware
from service.api.middleware import BodyLimitMiddleware
from service.api.routes import admin, chat, feedback, health, metrics, models, responses, web
from service.api.widget_cors import WidgetCORSMiddleware
from service.serving.state import AppState, StartRun
from service.settings import Settings, get_settings


def create_app(settings: Settings | None = None, start_run: StartRun | None = None) -> FastAPI:
    """The API of one replica; `start_run` queues a training run for POST /admin/train (None: that route
    answers 503). The API never imports the workers itself: `chatloop serve` hands it the Celery chain."""
    settings = settings or get_settings()
    state = AppState(settings, start_run)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start_loading()
        yield
        await state.close()

    app = FastAPI(title="chatloop", version="0.1.0", lifespan=lifespan)
    app.state.chatloop = state
    install_error_handlers(app)
    app.add_middleware(WidgetCORSMiddleware, origins=settings.widget_origins)  # innermost: errors get CORS too
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(HostCheckMiddleware, allowed_hosts=settings.allowed_hosts)  # before any body is read
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)  # added last: outermost, so every log line has the id
    routers = [health.router, metrics.router, models.router, chat.routes(settings), responses.router,
               feedback.routes(settings), admin.router, web.router]
    for router in routers:
        app.include_router(router)
    return app
