"""The OpenAPI document. Request bodies are parsed by hand (JSON or multipart: server/api/body.py), so the
models of those bodies are added to its components explicitly."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.schemas import (
    DetectRequest,
    EmbedRequest,
    PropagateRequest,
    SegmentRequest,
    TrackStartRequest,
    TrackStepRequest,
    VideoFrameRequest,
)
from server.services.prefetch import PrefetchRequest
from server.services.warmup import LookaheadRequest


def openapi(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        # Request bodies are parsed by hand (JSON or multipart), so their models are added explicitly.
        for model in (EmbedRequest, SegmentRequest, DetectRequest, PrefetchRequest, TrackStartRequest,
                      TrackStepRequest, PropagateRequest, LookaheadRequest, VideoFrameRequest):  # fmt: skip
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        app.openapi_schema = schema
    return app.openapi_schema
