"""Liveness and readiness probes."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from common.models import BASE
from service.api.deps import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: StateDep) -> JSONResponse:
    if state.ready:
        engine = state.engine
        return JSONResponse(
            {
                "status": "ready",
                "production_adapter": state.adapters.production,
                # set while the registry's production cannot be loaded here (production_adapter is the last good)
                "adapter_error": state.adapters.load_error,
                "loaded_adapters": sorted(a for a in engine.adapters if a != BASE),
                "active_sequences": engine.active_sequences(),
                "decode_steps": engine.steps,
            }
        )
    status = "failed" if state.error else "loading"
    return JSONResponse({"status": status, "error": state.error}, status_code=503)
