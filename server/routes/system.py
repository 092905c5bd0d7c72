"""Models, cache and health endpoints."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.errors import ApiError
from server.l2 import TierUnavailable
from server.state import services

router = APIRouter(tags=["system"])


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    """Every known model: loaded or not, with what it runs on and the command that makes it available."""
    svc = services(request)
    return {"device": str(svc.registry.device), "models": svc.registry.describe()}


@router.get("/v1/cache/stats")
def cache_stats(request: Request) -> dict:
    """Each tier: `embeddings` (L1, in process), `l2` (Redis or disk; null when not configured), the
    per-model `encoders` queues, and `refinement` (low-res logits of earlier clicks)."""
    return services(request).sam.stats()


@router.delete("/v1/cache")
def clear_cache(request: Request, scope: Literal["local", "all"] = "local") -> dict:
    """`local` (default): this process's L1 embeddings and refinement logits. `all`: also the L2 entries of
    this server's namespace, which every replica sharing that L2 loses too."""
    try:
        return {"cleared": services(request).sam.clear(l2_too=scope == "all")}
    except TierUnavailable as exc:
        raise ApiError(503, "cache_unavailable", f"{exc}; L1 was cleared.") from None


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "alive"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    registry = services(request).registry
    body = {"ready": registry.ready, "models": {r["name"]: r["state"] for r in registry.describe()}}
    return JSONResponse(body, status_code=200 if registry.ready else 503)
