"""One image-encoder queue per model: interactive encodes go before background (prefetch) encodes.

A single worker thread runs the encodes one at a time, always taking the oldest interactive request first,
so an interactive request waits for at most the one encode already running, never for queued background
work. This is also the place where GPU encodes of several images would be batched together.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from models.base import ImageEmbedding


class Priority(IntEnum):
    INTERACTIVE = 0
    BACKGROUND = 1


@dataclass(eq=False)
class EncodeTicket:
    priority: Priority
    image: np.ndarray | None
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    finished: float | None = None
    finished_at_submit: int = 0  # the scheduler's count of finished encodes when this one was queued
    finished_before_start: int = 0  # encodes that finished while this one waited
    future: Future[ImageEmbedding] = field(default_factory=Future)

    def result(self) -> ImageEmbedding:
        return self.future.result()

    @property
    def queued_ms(self) -> float:
        return ((self.started or self.submitted) - self.submitted) * 1000

    @property
    def run_ms(self) -> float:
        if self.started is None or self.finished is None:
            return 0.0
        return (self.finished - self.started) * 1000


@dataclass
class SchedulerStats:
    done: dict[str, int] = field(default_factory=lambda: {p.name.lower(): 0 for p in Priority})
    # The most encodes an interactive request ever waited for: 1 is the one running when it arrived.
    interactive_waited_encodes_max: int = 0
    interactive_queued_ms_max: float = 0.0
    promoted: int = 0  # background encodes moved up because an interactive request waited for them


class EncodeScheduler:
    def __init__(self, encode: Callable[[np.ndarray], ImageEmbedding], name: str) -> None:
        self._encode = encode
        self._queues: dict[Priority, deque[EncodeTicket]] = {p: deque() for p in Priority}
        self._ready = threading.Condition()
        self._running: EncodeTicket | None = None
        self._finished = 0
        self._closed = False
        self.stats = SchedulerStats()
        self._worker = threading.Thread(target=self._loop, name=f"encoder-{name}", daemon=True)
        self._worker.start()

    def submit(self, image: np.ndarray, priority: Priority) -> EncodeTicket:
        ticket = EncodeTicket(priority, image)
        with self._ready:
            if self._closed:
                raise RuntimeError("the encoder is shut down")
            ticket.finished_at_submit = self._finished
            self._queues[priority].append(ticket)
            self._ready.notify()
        return ticket

    def encode(self, image: np.ndarray, priority: Priority) -> EncodeTicket:
        """Submit and wait; the ticket carries the embedding and how long it queued and ran."""
        ticket = self.submit(image, priority)
        ticket.result()
        return ticket

    def promote(self, ticket: EncodeTicket) -> None:
        """Give a queued background encode interactive priority: an interactive request waits for it (the
        same image), and must not wait behind other clicks for as long as background work would."""
        with self._ready:
            try:
                self._queues[Priority.BACKGROUND].remove(ticket)
            except ValueError:  # already running, done, or promoted
                return
            ticket.priority = Priority.INTERACTIVE
            self._queues[Priority.INTERACTIVE].append(ticket)
            self.stats.promoted += 1

    def close(self) -> None:
        """Fail whatever is still queued and stop the worker after the running encode."""
        with self._ready:
            self._closed = True
            queued = [t for q in self._queues.values() for t in q]
            for queue in self._queues.values():
                queue.clear()
            self._ready.notify()
        for ticket in queued:
            if ticket.future.set_running_or_notify_cancel():
                ticket.future.set_exception(RuntimeError("the encoder was shut down"))

    def snapshot(self) -> dict:
        with self._ready:
            return {
                "queued": {p.name.lower(): len(q) for p, q in self._queues.items()},
                "running": self._running.priority.name.lower() if self._running else None,
                "done": dict(self.stats.done),
                "interactive_waited_encodes_max": self.stats.interactive_waited_encodes_max,
                "interactive_queued_ms_max": round(self.stats.interactive_queued_ms_max, 1),
                "promoted": self.stats.promoted,
            }

    def _take(self) -> EncodeTicket | None:
        """The next ticket to run, highest priority first, oldest first; None once closed."""
        with self._ready:
            while True:
                if self._closed:
                    return None
                for priority in Priority:
                    queue = self._queues[priority]
                    while queue:
                        ticket = queue.popleft()
                        if ticket.future.set_running_or_notify_cancel():  # False: cancelled while queued
                            ticket.started = time.perf_counter()
                            ticket.finished_before_start = self._finished - ticket.finished_at_submit
                            self._running = ticket
                            self._note_start(ticket)
                            return ticket
                self._ready.wait()

    def _note_start(self, ticket: EncodeTicket) -> None:
        if ticket.priority == Priority.INTERACTIVE:
            stats = self.stats
            stats.interactive_waited_encodes_max = max(
                stats.interactive_waited_encodes_max, ticket.finished_before_start
            )
            stats.interactive_queued_ms_max = max(stats.interactive_queued_ms_max, ticket.queued_ms)

    def _loop(self) -> None:
        while (ticket := self._take()) is not None:
            image, ticket.image = ticket.image, None  # not kept alive by the ticket after the encode
            try:
                result = self._encode(image)  # type: ignore[arg-type]
            except BaseException as exc:  # the waiting request learns why
                ticket.finished = time.perf_counter()
                self._finish(ticket)
                ticket.future.set_exception(exc)
                continue
            ticket.finished = time.perf_counter()
            self._finish(ticket)
            ticket.future.set_result(result)

    def _finish(self, ticket: EncodeTicket) -> None:
        with self._ready:
            self._running = None
            self._finished += 1
            self.stats.done[ticket.priority.name.lower()] += 1
