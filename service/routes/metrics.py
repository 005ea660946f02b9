"""GET /metrics in Prometheus' text format."""

import asyncio
import json

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import metrics
from service.deps import StateDep

router = APIRouter(tags=["metrics"])


async def last_finished_run(state) -> dict | None:
    from workers.runs import RUNS, run_key  # here, as in routes/admin.py: Celery loads only when asked for

    redis = state.redis
    for run_id in await redis.lrange(RUNS, 0, 19):
        run = {k: json.loads(v) for k, v in (await redis.hgetall(run_key(run_id))).items()}
        if run.get("status") in ("promoted", "rejected", "failed"):
            return run
    return None


@router.get("/metrics")
async def prometheus(state: StateDep) -> Response:
    if state.ready:
        metrics.BATCH_SIZE.set(state.engine.active_sequences())
        metrics.ADAPTER.info({"version": state.adapters.production})
        metrics.SWAPS.set(state.adapters.swaps)
    try:
        run = await asyncio.wait_for(last_finished_run(state), timeout=1)
    except Exception:  # metrics must answer even when Redis does not
        run = None
    if run is not None:
        metrics.TRAINING_OK.set(1 if run["status"] == "promoted" else 0)
        if "finished" in run:
            metrics.TRAINING_SECONDS.set(run["finished"] - run["created"])
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
