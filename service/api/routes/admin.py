"""Admin routes (admin API key always required): adapters, promotion, rollback, training runs."""

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from service.api.deps import AdminCaller, RedisDep, SettingsDep, StateDep
from service.errors import APIError
from service.feedback.leaderboard import arena_outcomes, leaderboard
from service.store import feedback_store, registry, runs

router = APIRouter(prefix="/admin", tags=["admin"])


@router.get("/adapters")
async def list_adapters(caller: AdminCaller, redis: RedisDep) -> dict:
    versions = [await registry.metadata(redis, v) for v in await registry.versions(redis)]
    for meta in versions:
        meta.pop("adapter_config", None)
    return {"production": await registry.production(redis), "versions": versions,
            "history": await registry.history(redis)}


# `expected` (optional): the production the caller saw; if another promotion or rollback moved it since, 409.
Expected = Annotated[str | None, Query(description="The production version you saw; 409 if it is no longer.")]


@router.post("/adapters/{version}/promote")
async def promote(version: str, caller: AdminCaller, redis: RedisDep, expected: Expected = None) -> dict:
    try:
        previous = await registry.promote(redis, version, reason=f"admin {caller.principal}", expected=expected)
    except registry.UnknownVersion as exc:
        raise APIError(404, str(exc), "version", "adapter_not_found") from None
    except registry.AlreadyProduction as exc:  # a no-op promotion would make the next rollback a no-op too
        raise APIError(409, str(exc), "version", "already_production") from None
    except registry.PromotionConflict as exc:
        raise APIError(409, str(exc), "expected", "production_changed") from None
    return {"production": version, "previous": previous}


@router.post("/rollback")
async def rollback(caller: AdminCaller, redis: RedisDep, expected: Expected = None) -> dict:
    try:
        return {"production": await registry.rollback(redis, expected=expected)}
    except registry.PromotionConflict as exc:
        raise APIError(409, str(exc), "expected", "production_changed") from None
    except registry.NothingToRollBack as exc:
        raise APIError(409, str(exc), code="nothing_to_roll_back") from None


@router.get("/leaderboard")
async def arena_leaderboard(caller: AdminCaller, redis: RedisDep) -> dict:
    """Adapter versions rated from arena votes (Bradley-Terry on an Elo scale, 95% bootstrap intervals)."""
    events = [event for _, event in await feedback_store.all_events(redis)]
    rows = await asyncio.to_thread(leaderboard, arena_outcomes(events))
    return {"production": await registry.production(redis), "versions": rows}


@router.post("/train", status_code=202)
async def train(caller: AdminCaller, state: StateDep) -> JSONResponse:
    if state.start_run is None:
        raise APIError(503, "this server was started without a way to queue training", code="training_unavailable")
    run_id = await asyncio.to_thread(state.start_run, f"admin {caller.principal}")
    if run_id is None:
        raise APIError(409, "a training run is already in progress", code="training_in_progress")
    return JSONResponse({"run_id": run_id, "status": "queued"}, status_code=202)


@router.get("/tasks/{run_id}")
async def task(run_id: str, caller: AdminCaller, settings: SettingsDep) -> dict:
    run = await asyncio.to_thread(runs.get_run, runs.client(settings), run_id)
    if run is None:
        raise APIError(404, f"no training run {run_id!r}", "run_id", "run_not_found")
    return run


@router.get("/runs")
async def recent_runs(caller: AdminCaller, settings: SettingsDep) -> list[dict]:
    return await asyncio.to_thread(runs.recent_runs, runs.client(settings))
