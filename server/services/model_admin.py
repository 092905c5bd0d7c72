"""Unloading a model: what the services hold for it is dropped, then the memory the allocator caches for it
is given back. Work already running with it finishes first."""

from __future__ import annotations

import gc

import torch

from models.base import ImageEncoder
from models.registry import ModelRegistry
from server.services.detect import DetectService
from server.services.sam import SamService
from server.services.track import TrackService


def forget_model(
    registry: ModelRegistry,
    sam: SamService,
    detect: DetectService,
    track: TrackService,
    name: str,
    model: object,
) -> dict:
    """Drops every reference the services keep to the unloaded `model`; returns what was dropped."""
    dropped = {"embeddings": 0, "refinement": 0}
    if isinstance(model, ImageEncoder):
        dropped = sam.forget(model)
    detect.forget(name)
    dropped["track_states"] = track.forget_model(name)
    del model
    gc.collect()
    if registry.device.type == "cuda":
        torch.cuda.empty_cache()
    return dropped
