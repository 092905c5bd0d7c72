"""The long-lived objects one app instance serves with, and the typed FastAPI dependencies that hand them to
the routes, so a handler's signature says what it uses. The only module that reads `app.state`.

The dependencies are `async def`: FastAPI runs a plain `def` dependency on its thread pool, which would add
a thread hop to every click.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from models.registry import ModelRegistry
from server.api.auth import KeyRing
from server.api.backpressure import InflightLimiter, LatestWins
from server.jobs.engine import Engine
from server.ops.metrics import Metrics
from server.services import model_admin
from server.services.concepts import ConceptService
from server.services.detect import DetectService
from server.services.prefetch import PrefetchManager
from server.services.sam import SamService
from server.services.track import TrackService
from server.services.warmup import Warmup
from server.settings import Settings


@dataclass
class Services:
    settings: Settings
    registry: ModelRegistry
    sam: SamService
    detect: DetectService
    track: TrackService
    inflight: InflightLimiter
    latest_wins: LatestWins
    concepts: ConceptService

    def forget_model(self, name: str, model: object) -> dict:
        """Drops every reference the services keep to an unloaded model, then frees what the allocator
        caches for it. Work already running with it finishes first."""
        return model_admin.forget_model(self.registry, self.sam, self.detect, self.track, name, model)


async def services(request: Request) -> Services:
    return request.app.state.services


async def jobs(request: Request) -> Engine:
    return request.app.state.jobs


async def prefetch(request: Request) -> PrefetchManager:
    return request.app.state.prefetch


async def warmup(request: Request) -> Warmup:
    return request.app.state.warmup


async def latest_wins(request: Request) -> LatestWins:
    return request.app.state.latest_wins


async def metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def keyring(request: Request) -> KeyRing:
    return request.app.state.keyring


ServicesDep = Annotated[Services, Depends(services)]
JobsDep = Annotated[Engine, Depends(jobs)]
PrefetchDep = Annotated[PrefetchManager, Depends(prefetch)]
WarmupDep = Annotated[Warmup, Depends(warmup)]
LatestWinsDep = Annotated[LatestWins, Depends(latest_wins)]
MetricsDep = Annotated[Metrics, Depends(metrics)]
KeyRingDep = Annotated[KeyRing, Depends(keyring)]
