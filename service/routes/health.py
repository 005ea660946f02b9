"""Liveness and readiness probes."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.deps import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: StateDep) -> JSONResponse:
    if state.ready:
        return JSONResponse({"status": "ready", "production_adapter": state.adapters.production})
    status = "failed" if state.error else "loading"
    return JSONResponse({"status": status, "error": state.error}, status_code=503)
