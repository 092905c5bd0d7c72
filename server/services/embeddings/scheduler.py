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
from typing import Any

from models.base import ImageEmbedding


class Priority(IntEnum):
    INTERACTIVE = 0
    BACKGROUND = 1


@dataclass(eq=False)
class EncodeTicket:
    priority: Priority
    image: Any  # what Segmenter.prepare() made of the image; None once encoded
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
    """`encode_batch` with `max_batch` > 1 (GPU hosts): the tickets waiting when the worker takes one, up to
    `max_batch` (interactive first, then background), share one encoder pass; the worker waits up to
    `max_wait_ms` for company only while fewer are queued than fit."""

    def __init__(
        self,
        encode: Callable[[Any], ImageEmbedding],
        name: str,
        encode_batch: Callable[[list[Any]], list[ImageEmbedding]] | None = None,
        max_batch: int = 1,
        max_wait_ms: float = 0.0,
    ) -> None:
        self._encode = encode
        self._encode_batch = encode_batch
        self.max_batch = max_batch if encode_batch is not None else 1
        self.max_wait = max_wait_ms / 1000.0
        self.batch_sizes: dict[int, int] = {}
        self._queues: dict[Priority, deque[EncodeTicket]] = {p: deque() for p in Priority}
        self._ready = threading.Condition()
        self._running: EncodeTicket | None = None
        self._finished = 0
        self._closed = False
        self._retired: Exception | None = None  # set by retire(): what new submissions are told
        self.stats = SchedulerStats()
        self._worker = threading.Thread(target=self._loop, name=f"encoder-{name}", daemon=True)
        self._worker.start()

    def submit(self, image: Any, priority: Priority) -> EncodeTicket:
        ticket = EncodeTicket(priority, image)
        with self._ready:
            if self._retired is not None:
                raise self._retired
            if self._closed:
                raise RuntimeError("the encoder is shut down")
            ticket.finished_at_submit = self._finished
            self._queues[priority].append(ticket)
            self._ready.notify()
        return ticket

    def encode(self, image: Any, priority: Priority) -> EncodeTicket:
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

    def retire(self, reason: Exception) -> None:
        """The model is going away: encodes already queued still run, new ones are refused with `reason`, and
        the worker (with its reference to the model) ends once the queue is empty."""
        with self._ready:
            self._retired = reason
            self._ready.notify()

    def drain(self, reason: Callable[[], Exception]) -> int:
        """The server is stopping: the running encode finishes, and the queued ones fail at once with
        `reason()`, so their requests get an answer instead of holding the shutdown for an encode each. New
        submissions are refused the same way. Returns how many queued encodes failed."""
        with self._ready:
            self._retired = reason()
            queued = self._take_all()
        return self._fail(queued, reason)

    def close(self) -> None:
        """Fail whatever is still queued and stop the worker after the running encode."""
        with self._ready:
            self._closed = True
            queued = self._take_all()
        self._fail(queued, lambda: RuntimeError("the encoder was shut down"))

    def _take_all(self) -> list[EncodeTicket]:
        """Call with self._ready held: empties the queues (and wakes the worker to notice why)."""
        queued = [t for q in self._queues.values() for t in q]
        for queue in self._queues.values():
            queue.clear()
        self._ready.notify()
        return queued

    @staticmethod
    def _fail(tickets: list[EncodeTicket], reason: Callable[[], Exception]) -> int:
        failed = 0
        for ticket in tickets:
            if ticket.future.set_running_or_notify_cancel():  # False: cancelled while queued
                ticket.future.set_exception(reason())  # one exception per waiter: each gets its own traceback
                failed += 1
        return failed

    def snapshot(self) -> dict:
        with self._ready:
            return {
                "queued": {p.name.lower(): len(q) for p, q in self._queues.items()},
                "running": self._running.priority.name.lower() if self._running else None,
                "done": dict(self.stats.done),
                "interactive_waited_encodes_max": self.stats.interactive_waited_encodes_max,
                "interactive_queued_ms_max": round(self.stats.interactive_queued_ms_max, 1),
                "promoted": self.stats.promoted,
                "batch_sizes": dict(self.batch_sizes),
            }

    def _take(self) -> EncodeTicket | None:
        """The next ticket to run, highest priority first, oldest first; None once closed."""
        with self._ready:
            while True:
                if self._closed:
                    return None
                if self._retired is not None and not any(self._queues.values()):
                    self._encode = self._encode_batch = None  # type: ignore[assignment]
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

    def _more(self, first: EncodeTicket) -> list[EncodeTicket]:
        """Up to max_batch - 1 more queued tickets to encode with `first`, interactive first."""
        deadline = time.perf_counter() + self.max_wait
        taken: list[EncodeTicket] = []
        with self._ready:
            while sum(len(q) for q in self._queues.values()) < self.max_batch - 1 and not self._closed:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or not self._ready.wait(remaining):
                    break
            for priority in Priority:
                queue = self._queues[priority]
                while queue and len(taken) < self.max_batch - 1:
                    ticket = queue.popleft()
                    if ticket.future.set_running_or_notify_cancel():
                        ticket.started = time.perf_counter()
                        ticket.finished_before_start = self._finished - ticket.finished_at_submit
                        self._note_start(ticket)
                        taken.append(ticket)
        return taken

    def _run_batch(self, tickets: list[EncodeTicket]) -> None:
        images = [t.image for t in tickets]
        for ticket in tickets:
            ticket.image = None
        self.batch_sizes[len(tickets)] = self.batch_sizes.get(len(tickets), 0) + 1
        try:
            results = self._encode_batch(images)  # type: ignore[misc, arg-type]
        except BaseException as exc:
            for ticket in tickets:
                ticket.finished = time.perf_counter()
                self._finish(ticket)
                ticket.future.set_exception(exc)
            return
        for ticket, result in zip(tickets, results, strict=True):
            ticket.finished = time.perf_counter()
            self._finish(ticket)
            ticket.future.set_result(result)

    def _loop(self) -> None:
        while (ticket := self._take()) is not None:
            if self.max_batch > 1:
                more = self._more(ticket)
                if more:
                    self._run_batch([ticket, *more])
                    continue
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
