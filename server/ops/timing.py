"""Per-stage wall-clock timings of a request, for the response body and the Server-Timing header."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from server.ops.request_context import note_timings


class Timings:
    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        note_timings(self)  # the request's stages also feed the per-stage latency histograms

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + (time.perf_counter() - started) * 1000.0

    def add(self, name: str, ms: float) -> None:
        """A stage timed elsewhere (another thread)."""
        self.stages[name] = self.stages.get(name, 0.0) + ms

    def as_dict(self) -> dict[str, float]:
        return {name: round(ms, 2) for name, ms in self.stages.items()}

    def header(self) -> str:
        return ", ".join(f"{name};dur={ms:.2f}" for name, ms in self.stages.items())
