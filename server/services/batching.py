"""Micro-batching: requests that arrive together share one model forward pass, so N users do not cost N
sequential passes on a GPU. Only requests with the same key (model and parameters) are batched together."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from server.errors import ApiError, busy

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size → how many batches had it


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        run: Callable[[Hashable, list[T]], list[R]],
        max_batch: int,
        max_wait_ms: float,
        name: str,
        max_queue: int = 1 << 30,
        timeout_s: float | None = None,
        retry_after_s: float = 1.0,
    ) -> None:
        self._run = run
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.refused = 0
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._queue: deque[tuple[Hashable, T, Future[R]]] = deque()
        self._ready = threading.Condition()
        self.stats = BatchStats()
        self._retired: Exception | None = None  # set by retire(): what new submissions are told
        self._worker = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._worker.start()

    def submit(self, key: Hashable, item: T) -> R:
        """Blocks until the item's batch has run; raises what the batch raised, a 503 when the queue is full,
        a 504 after `timeout_s` in the queue (the item is then dropped, never run)."""
        future: Future[R] = Future()
        with self._ready:
            if self._retired is not None:
                raise self._retired
            if len(self._queue) >= self.max_queue:
                self.refused += 1
                raise busy(f"{self.max_queue} requests queued for this model", self.retry_after_s)
            self._queue.append((key, item, future))
            self._ready.notify()
        try:
            return future.result(self.timeout_s)
        except FutureTimeout:
            with self._ready:
                waiting = [e for e in self._queue if e[2] is not future]  # identity: items are arrays
                if len(waiting) < len(self._queue):
                    self._queue = deque(waiting)
                    raise ApiError(
                        504, "request_timeout", f"The request waited {self.timeout_s:g} s for the model."
                    ) from None
            return future.result()  # its batch is running: it finishes soon

    def retire(self, reason: Exception) -> None:
        """The model is going away: queued requests still run, new ones are refused with `reason`, and the
        worker (with its reference to the model) ends once the queue is empty."""
        with self._ready:
            self._retired = reason
            self._ready.notify()

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    if self._retired is not None:
                        self._run = None  # type: ignore[assignment]
                        return
                    self._ready.wait()
                key = self._queue[0][0]
                deadline = time.monotonic() + self.max_wait
                # Wait for company until the batch is full or the first request has waited max_wait.
                while self._queued(key) < self.max_batch and (remaining := deadline - time.monotonic()) > 0:
                    self._ready.wait(remaining)
                batch = self._take(key)
                self._record_batch(len(batch))
            self._execute(key, batch)

    def _queued(self, key: Hashable) -> int:
        return sum(1 for k, _, _ in self._queue if k == key)

    def _record_batch(self, size: int) -> None:
        self.stats.batches += 1
        self.stats.items += size
        self.stats.largest = max(self.stats.largest, size)
        self.stats.sizes[size] = self.stats.sizes.get(size, 0) + 1

    def snapshot(self) -> tuple[int, BatchStats]:
        """Requests waiting now, and a copy of the batch statistics (both counted under the queue's lock)."""
        with self._ready:
            return len(self._queue), replace(self.stats, sizes=dict(self.stats.sizes))

    def _take(self, key: Hashable) -> list[tuple[T, Future[R]]]:
        taken, kept = [], deque()
        for entry in self._queue:
            if entry[0] == key and len(taken) < self.max_batch:
                taken.append((entry[1], entry[2]))
            else:
                kept.append(entry)
        self._queue = kept
        return taken

    def _execute(self, key: Hashable, batch: list[tuple[T, Future[R]]]) -> None:
        try:
            results = self._run(key, [item for item, _ in batch])
        except BaseException as exc:  # every request of the batch learns why
            for _, future in batch:
                future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)
