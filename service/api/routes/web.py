"""The web chat: the page at /, its static files, and GET /v1/status for its status panel; the feedback widget."""

import asyncio
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.api.deps import CallerDep, RedisDep, SettingsDep, StateDep
from service.errors import APIError
from service.settings import Settings
from service.store import feedback_store, runs

router = APIRouter(tags=["web"])
STATIC = Path(__file__).resolve().parent.parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# A run record also holds its trigger (an API key id), errors and metrics; the panel shows only these.
RUN_FIELDS = ("id", "status", "stage", "progress", "created", "finished", "candidate")


def _static(name: str) -> FileResponse:
    path = STATIC / name
    if path.suffix not in MEDIA_TYPES or path.parent != STATIC or not path.is_file():
        raise APIError(404, f"no static file {name!r}", code="not_found")
    # no-cache: browsers revalidate (ETag), so a new release is picked up on the next load.
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return _static("index.html")


@router.get("/widget.js", include_in_schema=False)
async def widget() -> FileResponse:
    """The embeddable feedback widget (README, The feedback widget): a plain <script> from any page."""
    return _static("widget.js")


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> FileResponse:
    return _static(name)


def latest_run(settings: Settings) -> dict | None:
    run = next(iter(runs.recent_runs(runs.client(settings), 1)), None)
    if run is None:
        return None
    run = {k: run[k] for k in RUN_FIELDS if k in run}
    if isinstance(run.get("progress"), dict):
        run["progress"] = {k: run["progress"].get(k) for k in ("stage", "step", "total")}
    return run


@router.get("/v1/status")
async def status(state: StateDep, caller: CallerDep, redis: RedisDep, settings: SettingsDep) -> dict:
    """What the web chat's status panel shows: readiness, the production adapter, feedback counts, the latest run."""
    return {
        "status": "ready" if state.ready else ("failed" if state.error else "loading"),
        "production_adapter": state.adapters.production if state.ready else None,
        "feedback": await feedback_store.stats(redis),
        "training": await asyncio.to_thread(latest_run, settings),
    }
