"""GET /v1/models: the production policy, the base, and every stored adapter version."""

import time

from fastapi import APIRouter

from common.models import BASE
from service.api.deps import CallerDep, ReadyDep
from service.api.schemas import ModelCard, ModelList
from service.serving.adapters import BASE_MODEL, PRODUCTION_MODEL
from service.serving.arena import ARENA_MODEL, LABEL

router = APIRouter(prefix="/v1", tags=["models"])
STARTED = int(time.time())


@router.get("/models")
async def list_models(state: ReadyDep, caller: CallerDep) -> ModelList:
    adapters = state.adapters
    cards = [
        ModelCard(id=PRODUCTION_MODEL, created=STARTED, adapter=adapters.production),
        ModelCard(id=BASE_MODEL, created=STARTED, adapter=BASE),
        ModelCard(id=ARENA_MODEL, created=STARTED, adapter=LABEL),
    ]
    cards += [ModelCard(id=v, created=STARTED, adapter=v) for v in await adapters.versions()]
    return ModelList(data=cards)
