"""The FastAPI application: a thin HTTP layer over the model registry and the services."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from models.base import ModelLoading, ModelUnavailable, UnknownModel
from models.registry import ModelRegistry
from server import allocator
from server.backpressure import InflightLimiter, InflightMiddleware, LatestWins
from server.cvat import nuclio
from server.cvat.warmup import LookaheadRequest, Warmup
from server.detect_service import DetectService
from server.errors import error_body, install_error_handlers
from server.jobs import routes as job_routes
from server.jobs.engine import LocalEngine
from server.jobs.store import JOBS_DB_NAME
from server.middleware import install_request_pipeline
from server.prefetch import PrefetchManager, PrefetchRequest
from server.routes import cvat as cvat_routes
from server.routes import detect, prefetch, sam, system, track
from server.sam_service import SamService
from server.schemas import (
    DetectRequest,
    EmbedRequest,
    PropagateRequest,
    SegmentRequest,
    TrackStartRequest,
    TrackStepRequest,
)
from server.settings import Settings, get_settings
from server.state import Services
from server.track_service import TrackService

log = logging.getLogger("labelserve")


def create_app(settings: Settings | None = None, *, load_models_in_background: bool = True) -> FastAPI:
    settings = settings or get_settings()
    log.info("allocator: %s", allocator.apply(settings.allocator))
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
    app.state.services = Services(
        settings, registry, sam_service, detect_service, track_service, inflight, LatestWins()
    )
    app.state.jobs = jobs
    app.state.inflight = inflight
    app.state.latest_wins = app.state.services.latest_wins
    app.add_middleware(InflightMiddleware, limiter=inflight)
    app.state.prefetch = prefetcher
    app.state.warmup = warmup
    install_error_handlers(app)
    _install_model_errors(app)
    app.include_router(sam.router)
    app.include_router(detect.router)
    app.include_router(track.router)
    app.include_router(system.router)
    app.include_router(nuclio.router)
    app.include_router(job_routes.router)
    app.include_router(prefetch.router)
    app.include_router(cvat_routes.router)
    install_request_pipeline(app, settings, jobs.store)  # after the routers: it checks each has a scope
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _install_model_errors(app: FastAPI) -> None:
    @app.exception_handler(UnknownModel)
    async def _unknown(_: Request, exc: UnknownModel) -> JSONResponse:
        return JSONResponse(error_body("unknown_model", str(exc)), status_code=404)

    @app.exception_handler(ModelUnavailable)
    async def _unavailable(_: Request, exc: ModelUnavailable) -> JSONResponse:
        message = f"{exc} Fix: {exc.fix}" if exc.fix else str(exc)
        return JSONResponse(error_body("model_unavailable", message), status_code=503)

    @app.exception_handler(ModelLoading)
    async def _loading(_: Request, exc: ModelLoading) -> JSONResponse:
        return JSONResponse(
            error_body("model_loading", str(exc)), status_code=503, headers={"Retry-After": "5"}
        )


def _openapi(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        # Request bodies are parsed by hand (JSON or multipart), so their models are added explicitly.
        for model in (EmbedRequest, SegmentRequest, DetectRequest, PrefetchRequest, TrackStartRequest,
                      TrackStepRequest, PropagateRequest, LookaheadRequest):  # fmt: skip
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        app.openapi_schema = schema
    return app.openapi_schema


def job_engine(registry: ModelRegistry, detect: DetectService, settings: Settings) -> LocalEngine:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return LocalEngine(
        registry.detector,
        refine=detect.refine_for_job,
        check_refine=registry.segmenter,
        state_db=settings.data_dir / JOBS_DB_NAME,
        settings=settings,
        prefetch=settings.job_prefetch,
        readers=settings.job_reader_threads(registry.device.type == "cuda"),
        concurrency=settings.job_concurrency,
    )
