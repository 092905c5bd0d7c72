"""A circuit breaker, so that a dead or hanging cache backend costs one timeout, not one per click."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]


class Breaker:
    """Closed: every call goes through. A failure opens it: calls are skipped for `retry_s`, then a single
    trial call goes through (half-open); its success closes the breaker, its failure reopens it with the
    wait doubled, up to `max_retry_s`."""

    def __init__(
        self, retry_s: float, max_retry_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.retry_s = retry_s
        self.max_retry_s = max(max_retry_s, retry_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._state: BreakerState = "closed"
        self._wait = retry_s
        self._retry_at = 0.0
        self.opened = 0  # how many times it opened

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def wait_s(self) -> float:
        """How long calls are skipped after the latest failure."""
        return self._wait

    def allow(self) -> bool:
        """Whether to make the call now. A True must be followed by succeeded() or failed()."""
        with self._lock:
            if self._state == "closed":
                return True
            if self._state == "open" and self._clock() >= self._retry_at:
                self._state = "half_open"  # this caller makes the trial call; the others keep skipping
                return True
            return False

    def succeeded(self) -> None:
        with self._lock:
            self._state, self._wait = "closed", self.retry_s

    def failed(self) -> None:
        with self._lock:
            if self._state == "half_open":
                self._wait = min(self._wait * 2, self.max_retry_s)
            elif self._state == "closed":
                self._wait = self.retry_s
                self.opened += 1
            self._state = "open"
            self._retry_at = self._clock() + self._wait

    def snapshot(self) -> dict:
        with self._lock:
            retry_in = max(self._retry_at - self._clock(), 0.0) if self._state == "open" else 0.0
            return {"state": self._state, "opened": self.opened, "retry_in_s": round(retry_in, 3)}
