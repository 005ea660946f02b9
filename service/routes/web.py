"""The web chat: the page at /, its static files, and GET /v1/status for its status panel."""

import json
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from redis.asyncio import Redis

from service import feedback_store
from service.deps import CallerDep, RedisDep, StateDep
from service.errors import APIError

router = APIRouter(tags=["web"])
STATIC = Path(__file__).resolve().parent.parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# A run record also holds its trigger (an API key id), errors and event ids; the panel shows only these.
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


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> FileResponse:
    return _static(name)


async def latest_run(redis: Redis) -> dict | None:
    from workers.runs import RUNS, run_key  # here, as in routes/admin.py: Celery loads only when asked for

    run_id = await redis.lindex(RUNS, 0)
    if run_id is None:
        return None
    values = await redis.hmget(run_key(run_id), RUN_FIELDS)
    run = {k: json.loads(v) for k, v in zip(RUN_FIELDS, values, strict=True) if v is not None}
    if isinstance(run.get("progress"), dict):
        run["progress"] = {k: run["progress"].get(k) for k in ("stage", "step", "total")}
    return run or None


@router.get("/v1/status")
async def status(state: StateDep, caller: CallerDep, redis: RedisDep) -> dict:
    """What the web chat's status panel shows: readiness, the production adapter, feedback counts, the latest run."""
    return {
        "status": "ready" if state.ready else ("failed" if state.error else "loading"),
        "production_adapter": state.adapters.production if state.ready else None,
        "feedback": await feedback_store.stats(redis),
        "training": await latest_run(redis),
    }
