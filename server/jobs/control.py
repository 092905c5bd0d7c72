"""This process's handle on a queued or running job, and the error that fails a job with a message."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class JobControl:
    """This process's handle on a queued or running job."""

    stop: threading.Event = field(default_factory=threading.Event)
    reason: str | None = None  # "cancel" or "shutdown"
    started: float | None = None  # monotonic time processing began in this process
    processed: int = 0

    def halt(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.stop.set()

    def rate(self) -> float | None:
        if self.started is None or not self.processed:
            return None
        return self.processed / max(time.monotonic() - self.started, 1e-6)


class JobFailed(Exception):
    """The job cannot go on; str() is the job's error. Items still pending stay pending, for a resume."""
