"""The long-lived objects one app instance serves with."""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
from fastapi import Request

from models.base import Segmenter
from models.registry import ModelRegistry
from server.backpressure import InflightLimiter, LatestWins
from server.detect_service import DetectService
from server.sam_service import SamService
from server.settings import Settings
from server.track_service import TrackService


@dataclass
class Services:
    settings: Settings
    registry: ModelRegistry
    sam: SamService
    detect: DetectService
    track: TrackService
    inflight: InflightLimiter
    latest_wins: LatestWins

    def forget_model(self, name: str, model: object) -> dict:
        """Drops every reference the services keep to an unloaded model, then frees what the allocator
        caches for it. Work already running with it finishes first."""
        dropped = {"embeddings": 0, "refinement": 0}
        if isinstance(model, Segmenter):
            dropped = self.sam.forget(model)
        self.detect.forget(name)
        dropped["track_states"] = self.track.forget_model(name)
        del model
        gc.collect()
        if self.registry.device.type == "cuda":
            torch.cuda.empty_cache()
        return dropped


def services(request: Request) -> Services:
    return request.app.state.services
