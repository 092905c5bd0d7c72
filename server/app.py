"""The composition root: builds the registry, the services and the job engine from the settings, and serves
them through the API's routers (server/api/). Nothing else is decided here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from models.registry import ModelRegistry
from server.api.backpressure import InflightLimiter, InflightMiddleware, LatestWins
from server.api.deps import Services
from server.api.errors import install_error_handlers, install_model_errors
from server.api.middleware import install_request_pipeline
from server.api.openapi import openapi
from server.api.routers import ROUTERS
from server.jobs.engine import LocalEngine
from server.jobs.store import JOBS_DB_NAME
from server.ops import allocator
from server.scale.batch import RayBatchEngine, ray_available
from server.services.concepts import ConceptService
from server.services.detect import DetectService
from server.services.prefetch import PrefetchManager
from server.services.sam import SamService
from server.services.track import TrackService
from server.services.warmup import Warmup
from server.settings import Settings, get_settings

log = logging.getLogger("labelserve")


def create_app(settings: Settings | None = None, *, load_models_in_background: bool = True) -> FastAPI:
    settings = settings or get_settings()
    log.info("allocator: %s", allocator.apply(settings.allocator))
    allocator.start_trimming(allocator.loaded() or "glibc", settings.memory_trim_s)
    registry = ModelRegistry(settings)
    sam_service = SamService(registry, settings)
    detect_service = DetectService(registry, settings, sam_service)
    jobs = job_engine(registry, detect_service, settings)
    prefetcher = PrefetchManager(sam_service, settings)
    warmup = Warmup(prefetcher, settings, lambda: registry.names_of("segmenter"))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = registry.start_loading() if load_models_in_background else None
        if loader is None:
            registry.load_enabled()
        resumed = jobs.resume_unfinished()  # resumed jobs wait for their models to finish loading
        if resumed:
            log.info("resumed %d unfinished jobs: %s", len(resumed), resumed)
        yield
        jobs.close()  # running jobs go back to queued; the next start resumes them
        prefetcher.close()
        sam_service.close()  # after the prefetch runner: its queued encodes fail rather than hang
        if loader is not None and loader.is_alive():
            # Exiting while torch builds a model in that thread aborts the process ("terminate called without
            # an active exception", exit 134): a stop during start-up waits for the build to end instead.
            log.info("stopping: waiting for the models being loaded")
            await asyncio.to_thread(loader.join)

    app = FastAPI(
        title="labelserve",
        version="0.1.0",
        description="AI-assisted labeling inference: SAM clicks on cached embeddings.",
        lifespan=lifespan,
    )
    track_service = TrackService(registry, sam_service, settings)
    inflight = InflightLimiter(
        settings.max_inflight_interactive, settings.max_inflight_other, settings.busy_retry_after_s
    )
    # What the routes reach through server/api/deps.py.
    app.state.services = Services(
        settings,
        registry,
        sam_service,
        detect_service,
        track_service,
        inflight,
        LatestWins(),
        ConceptService(registry, sam_service, settings),
    )
    app.state.jobs = jobs
    app.state.inflight = inflight
    app.state.latest_wins = app.state.services.latest_wins
    app.add_middleware(InflightMiddleware, limiter=inflight)
    app.state.prefetch = prefetcher

    def drain() -> None:
        """SIGTERM, before uvicorn waits for the requests in flight: prefetch runs stop and encodes not yet
        started are answered 503, so the wait is one running encode, not the whole queue."""
        prefetcher.close(timeout=0)
        queued = sam_service.drain()
        log.info("stopping: %d queued encodes answered 503 shutting_down", queued)

    app.state.drain = drain
    app.state.warmup = warmup
    install_error_handlers(app)
    install_model_errors(app)
    for router in ROUTERS:
        app.include_router(router)
    # After the routers: it checks each has a scope.
    app.state.metrics = install_request_pipeline(app, settings, app.state.services, jobs.store)
    app.openapi = lambda: openapi(app)  # type: ignore[method-assign]
    return app


def job_engine(registry: ModelRegistry, detect: DetectService, settings: Settings) -> LocalEngine:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return LocalEngine(
        registry.detector,
        refine=detect.refine_for_job,
        check_refine=registry.segmenter,
        embed=detect.pooled_embedding_for_job,
        state_db=settings.data_dir / JOBS_DB_NAME,
        settings=settings,
        prefetch=settings.job_prefetch,
        readers=settings.job_reader_threads(registry.device.type == "cuda"),
        concurrency=settings.job_concurrency,
        ray=RayBatchEngine(settings) if ray_available() else None,  # `"engine": "ray"` jobs
    )
