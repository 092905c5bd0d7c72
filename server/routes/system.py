"""Models, cache and health endpoints."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.state import services

router = APIRouter(tags=["system"])


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    """Every known model: loaded or not, with what it runs on and the command that makes it available."""
    svc = services(request)
    return {"device": str(svc.registry.device), "models": svc.registry.describe()}


@router.get("/v1/cache/stats")
async def cache_stats(request: Request) -> dict:
    return services(request).sam.stats()


@router.delete("/v1/cache")
async def clear_cache(request: Request) -> dict:
    return {"cleared": services(request).sam.clear()}


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "alive"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    registry = services(request).registry
    body = {"ready": registry.ready, "models": {r["name"]: r["state"] for r in registry.describe()}}
    return JSONResponse(body, status_code=200 if registry.ready else 503)
