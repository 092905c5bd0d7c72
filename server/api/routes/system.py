"""Models, cache and health endpoints."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.api.auth import ALL_SCOPES, presented_key
from server.api.deps import KeyRingDep, ServicesDep
from server.errors import ApiError
from server.services.embeddings.l2 import TierUnavailable

router = APIRouter(tags=["system"])


@router.get("/v1/models")
async def list_models(svc: ServicesDep) -> dict:
    """Every known model: loaded or not, with what it runs on and the command that makes it available."""
    return {"device": str(svc.registry.device), "models": svc.registry.describe()}


UNKNOWN_MODEL = {404: {"description": "Unknown model (GET /v1/models lists them)"}}


@router.post(
    "/v1/models/{model}/load",
    status_code=202,
    responses={200: {"description": "Loaded already"}, **UNKNOWN_MODEL},
)
def load_model(model: str, svc: ServicesDep) -> JSONResponse:
    """Loads a model (admin scope), also one not in `LABELSERVE_MODELS`, in the background: 202 while it
    loads (poll `GET /v1/models`; `/readyz` waits for it when it is one of `LABELSERVE_MODELS`), 200 when it
    was loaded already. The same checks as at start apply: sha256 against the manifest, and no random
    weights unless the server runs with `--random-init`. A failure shows in the model's `state`,
    `message` and `fix`."""
    record = svc.registry.request_load(model)
    return JSONResponse(record.describe(), status_code=200 if record.state == "loaded" else 202)


@router.post(
    "/v1/models/{model}/unload",
    responses={409: {"description": "The model is loading; unload it once loaded"}, **UNKNOWN_MODEL},
)
def unload_model(model: str, svc: ServicesDep) -> dict:
    """Unloads a model (admin scope) and frees its memory: its encoder and detection queues finish the
    requests they hold, later requests get 503 `model_unavailable` naming the load endpoint, and its L1
    embeddings, click history and tracking states are dropped (L2 keeps its embeddings). Answers the
    model's record and what was dropped; unloading a model that is not loaded changes nothing. 409 while
    it loads."""
    before, instance = svc.registry.unload(model)
    if before == "loading":
        raise ApiError(
            409, "model_loading", f"Model {model!r} is loading; wait until GET /v1/models shows it loaded."
        )
    dropped = svc.forget_model(model, instance) if before == "loaded" else None
    del instance
    return {**svc.registry.record(model).describe(), "was": before, "dropped": dropped}


@router.get("/v1/whoami")
def whoami(request: Request, keyring: KeyRingDep) -> dict:
    """Who the caller is: `auth` (whether this server takes API keys), the key's `id` and its `scopes`.
    Without keys configured every scope is open to anyone (`id` null). With keys, a call without a valid key
    is a 401, as on any other route; the web console asks it to know what to offer."""
    if not keyring.enabled:
        return {"auth": False, "id": None, "scopes": sorted(ALL_SCOPES)}
    key = presented_key(request.headers)
    entry = keyring.find(key) if key else None
    if entry is None:  # the gate let it through: the key was revoked in between
        raise ApiError(401, "invalid_api_key", "The API key is not valid (unknown or revoked).")
    return {"auth": True, "id": entry.id, "scopes": sorted(entry.scopes)}


@router.get("/v1/cache/stats")
def cache_stats(svc: ServicesDep) -> dict:
    """Each tier: `embeddings` (L1, in process), `l2` (Redis or disk; null when not configured), the
    per-model `encoders` queues, and `refinement` (low-res logits of earlier clicks)."""
    return svc.sam.stats()


@router.delete("/v1/cache")
def clear_cache(svc: ServicesDep, scope: Literal["local", "all"] = "local") -> dict:
    """`local` (default): this process's L1 embeddings and refinement logits. `all`: also the L2 entries of
    this server's namespace, which every replica sharing that L2 loses too."""
    try:
        return {"cleared": svc.sam.clear(l2_too=scope == "all")}
    except TierUnavailable as exc:
        raise ApiError(503, "cache_unavailable", f"{exc}; L1 was cleared.") from None


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "alive"}


@router.get("/readyz")
async def readyz(svc: ServicesDep) -> JSONResponse:
    registry = svc.registry
    body = {"ready": registry.ready, "models": {r["name"]: r["state"] for r in registry.describe()}}
    return JSONResponse(body, status_code=200 if registry.ready else 503)
