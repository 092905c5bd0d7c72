"""Helpers the benchmark scripts share."""

from __future__ import annotations

import time
from collections.abc import Callable


def timed_ms(fn: Callable[[], object], repeat: int) -> list[float]:
    """Wall time of each of `repeat` calls, in milliseconds."""
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out
