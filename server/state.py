"""The long-lived objects one app instance serves with."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

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


def services(request: Request) -> Services:
    return request.app.state.services
