"""GET /metrics in Prometheus' text format."""

import asyncio

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api import metrics
from service.api.deps import StateDep
from service.store import runs

router = APIRouter(tags=["metrics"])


@router.get("/metrics")
async def prometheus(state: StateDep) -> Response:
    if state.ready:
        metrics.BATCH_SIZE.set(state.engine.active_sequences())
        metrics.ADAPTER.info({"version": state.adapters.production})
        metrics.SWAPS.set(state.adapters.swaps)
        error = state.adapters.load_error
        metrics.ADAPTER_LOAD_FAILING.set(error is not None)
        metrics.ADAPTER_LOAD_ATTEMPTS.set(error["attempts"] if error else 0)
    try:
        run = await asyncio.wait_for(asyncio.to_thread(runs.last_finished_run, runs.client(state.settings)), timeout=1)
    except Exception:  # metrics must answer even when Redis does not
        run = None
    if run is not None:
        metrics.TRAINING_OK.set(1 if run["status"] == "promoted" else 0)
        if "finished" in run:
            metrics.TRAINING_SECONDS.set(run["finished"] - run["created"])
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
