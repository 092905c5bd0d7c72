"""Every router of the API, in the order they are included (the order routes are matched and documented in).
GET /metrics is added last, by the request pipeline (server/api/middleware.py)."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.routes import (
    concepts,
    console,
    cvat,
    detect,
    jobs,
    nuclio,
    prefetch,
    sam,
    storage,
    system,
    track,
    video,
)

ROUTERS: tuple[APIRouter, ...] = (
    sam.router,
    concepts.router,
    detect.router,
    track.router,
    video.router,
    system.router,
    nuclio.router,
    jobs.router,
    jobs.corrections_router,
    prefetch.router,
    cvat.router,
    storage.router,
    console.router,
)
