"""Prefetch: embeddings of the images an annotator is about to open (the next frames of a CVAT job),
computed in the background so that the first click on them is a cache hit.

Runs execute one after another on one runner thread. Within a run, two workers pipeline the items: one
reads, hashes and decodes the next image while the other's image is in the encoder, which always serves
interactive requests first (server/encode_scheduler.py). Run state lives in memory; it is progress
reporting, not a record, and a restart forgets it (the embeddings themselves stay in L2).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.encode_scheduler import Priority
from server.errors import ApiError
from server.jobs.spec import Source
from server.sam_service import SamService
from server.settings import Settings
from server.sources import READERS, ImageRef, read_image_ref
from server.timing import Timings

log = logging.getLogger("labelserve.prefetch")

PIPELINE_DEPTH = 2  # items in progress per run: one in the encoder, the next one read and decoded
FINISHED_KEPT = 100  # finished runs whose status stays queryable
FAILURES_SHOWN = 20

PrefetchState = Literal["queued", "running", "completed", "cancelled", "failed"]


class PrefetchRange(BaseModel):
    """A slice of the expanded image list, as Python's list[start:stop:step] (e.g. the frames of a job)."""

    model_config = ConfigDict(extra="forbid")

    start: int = Field(default=0, ge=0)
    stop: int | None = Field(default=None, ge=0, description="Exclusive; the end of the list when absent.")
    step: int = Field(default=1, ge=1)


class PrefetchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="The SAM model whose embeddings to compute.")
    images: list[ImageRef] | None = Field(
        default=None, min_length=1, description='Images as {"url": ...} or {"base64": ...}, in order.'
    )
    source: Source | None = Field(
        default=None, description="Images as a batch job's source (directory, paths, urls, ...)."
    )
    range: PrefetchRange | None = Field(default=None, description="Only this slice of the images.")

    @model_validator(mode="after")
    def _one_list(self) -> PrefetchRequest:
        if (self.images is None) == (self.source is None):
            raise ValueError("give exactly one of 'images' or 'source'")
        return self


class PrefetchFailure(BaseModel):
    index: int = Field(description="Position in the run's (sliced) image list.")
    image: str
    error: str


class PrefetchStatus(BaseModel):
    id: str
    model: str
    state: PrefetchState
    total: int
    done: int = Field(description="Images whose embedding is now cached (encoded, or found cached).")
    cached: int = Field(description="Of those, the ones that needed no encode (already in L1 or L2).")
    encoded: int
    failed: int
    pending: int
    images_per_second: float | None = Field(description="Images done or failed per second of running.")
    created_at: str = Field(description="ISO 8601, UTC, in milliseconds (as jobs).")
    started_at: str | None
    finished_at: str | None
    error: str | None = Field(description="Why the run failed (not why single images failed).")
    failures: list[PrefetchFailure] = Field(description=f"The first {FAILURES_SHOWN} failed images.")


@dataclass(frozen=True)
class _Item:
    index: int
    name: str
    ref: ImageRef | str  # a str is a job source's reference: a local path or a URL


@dataclass
class _Run:
    id: str
    model: str
    items: list[_Item]
    state: PrefetchState = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    cached: int = 0
    encoded: int = 0
    failures: list[PrefetchFailure] = field(default_factory=list)
    failed: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    def record(self, cached: bool) -> None:
        with self.lock:
            if cached:
                self.cached += 1
            else:
                self.encoded += 1

    def fail(self, item: _Item, error: str) -> None:
        with self.lock:
            self.failed += 1
            if len(self.failures) < FAILURES_SHOWN:
                self.failures.append(PrefetchFailure(index=item.index, image=item.name, error=error))

    def end(self, state: PrefetchState, error: str | None = None) -> None:
        with self.lock:
            self.state, self.error, self.finished = state, error, time.time()

    def rate(self) -> float | None:
        if self.started is None:
            return None
        elapsed = (self.finished or time.time()) - self.started
        processed = self.cached + self.encoded + self.failed
        return round(processed / elapsed, 3) if processed and elapsed > 0 else None

    def status(self) -> PrefetchStatus:
        with self.lock:
            done = self.cached + self.encoded
            return PrefetchStatus(
                id=self.id,
                model=self.model,
                state=self.state,
                total=len(self.items),
                done=done,
                cached=self.cached,
                encoded=self.encoded,
                failed=self.failed,
                pending=len(self.items) - done - self.failed,
                images_per_second=self.rate(),
                created_at=_iso(self.created),
                started_at=_iso(self.started),
                finished_at=_iso(self.finished),
                error=self.error,
                failures=list(self.failures),
            )


class PrefetchManager:
    def __init__(self, sam: SamService, settings: Settings) -> None:
        self.sam = sam
        self.settings = settings
        self._runs: OrderedDict[str, _Run] = OrderedDict()
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Run | None] = queue.Queue()
        self._runner = threading.Thread(target=self._loop, name="prefetch-runner", daemon=True)
        self._runner.start()

    # -- API -----------------------------------------------------------------------------------------------
    def submit(self, request: PrefetchRequest) -> PrefetchStatus:
        """Validate, expand and queue a run; ApiError when it cannot be (4xx) or the queue is full (503)."""
        self.sam.registry.segmenter(request.model)  # unknown (404) or unavailable/loading (503) model
        with self._lock:
            self._check_capacity()  # before a possibly long directory listing, and again to take the slot
        items = self._expand(request)
        run = _Run(uuid.uuid4().hex, request.model, items)
        with self._lock:
            self._check_capacity()
            self._runs[run.id] = run
        self._queue.put(run)
        log.info("prefetch %s: %d images for %s", run.id, len(items), request.model)
        return run.status()

    def status(self, run_id: str) -> PrefetchStatus:
        return self._run(run_id).status()

    def cancel(self, run_id: str) -> PrefetchStatus:
        """Items not started are skipped; the (at most two) already being read or encoded finish."""
        run = self._run(run_id)
        with run.lock:
            if not run.active:
                raise ApiError(
                    409, "prefetch_finished", f"Prefetch {run_id} is already {run.state}; nothing to cancel."
                )
            run.stop.set()
            if run.state == "queued":  # the runner skips it; a running run ends after its items in flight
                run.state, run.finished = "cancelled", time.time()
        return run.status()

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            run.stop.set()
        self._queue.put(None)
        self._runner.join(timeout)

    # -- submit helpers ------------------------------------------------------------------------------------
    def _check_capacity(self) -> None:
        """Call with self._lock held."""
        active = [run for run in self._runs.values() if run.active]
        if len(active) >= self.settings.prefetch_max_runs:
            retry = self._retry_after(active)
            raise ApiError(
                503,
                "prefetch_busy",
                f"{len(active)} prefetch runs are queued or running (LABELSERVE_PREFETCH_MAX_RUNS); retry in "
                f"{retry} s, or cancel one with DELETE /v1/prefetch/{{id}}.",
                headers={"Retry-After": str(retry)},
            )

    @staticmethod
    def _retry_after(active: list[_Run]) -> int:
        """Seconds until the running run should finish at its current rate (a slot frees then)."""
        running = [run for run in active if run.state == "running"]
        if running:
            status, rate = running[0].status(), running[0].rate()
            if rate:
                return max(1, min(300, round(status.pending / rate)))
        return 5

    def _expand(self, request: PrefetchRequest) -> list[_Item]:
        entries: list[tuple[ImageRef | str, str]]
        if request.images is not None:
            entries = [(ref, ref.url or f"images[{i}]") for i, ref in enumerate(request.images)]
        else:
            assert request.source is not None
            entries = list(request.source.enumerate(self.settings))
        if request.range is not None:
            entries = entries[request.range.start : request.range.stop : request.range.step]
            if not entries:
                raise ApiError(
                    400, "range_empty", f"The range {request.range.model_dump()} selects none of the images."
                )
        limit = self.settings.prefetch_max_images
        if len(entries) > limit:
            raise ApiError(
                422,
                "too_many_images",
                f"{len(entries)} images is more than one prefetch run takes ({limit}, "
                "LABELSERVE_PREFETCH_MAX_IMAGES); split it with 'range'.",
            )
        return [_Item(index, name, ref) for index, (ref, name) in enumerate(entries)]

    def _run(self, run_id: str) -> _Run:
        with self._lock:
            run = self._runs.get(run_id)
        if run is None:
            raise ApiError(
                404,
                "unknown_prefetch",
                f"No prefetch run {run_id!r}; it never existed, or finished long ago "
                f"(the last {FINISHED_KEPT} finished runs are kept).",
            )
        return run

    # -- running -------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while (run := self._queue.get()) is not None:
            with run.lock:
                if run.state != "queued":  # cancelled while it waited
                    continue
                run.state, run.started = "running", time.time()
            try:
                self._process(run)
            except Exception as exc:  # a bug: the run fails, the runner lives on
                log.exception("prefetch %s failed", run.id)
                run.end("failed", f"internal error: {exc}")
            else:
                run.end("cancelled" if run.stop.is_set() else "completed")
            status = run.status()
            log.info("prefetch %s %s: %d done, %d failed", run.id, status.state, status.done, status.failed)
            self._forget_finished()

    def _process(self, run: _Run) -> None:
        with ThreadPoolExecutor(PIPELINE_DEPTH, thread_name_prefix="prefetch") as pool:
            window: deque[Future[None]] = deque()
            for item in run.items:
                if run.stop.is_set():
                    break
                window.append(pool.submit(self._prefetch_one, run, item))
                if len(window) >= PIPELINE_DEPTH:
                    window.popleft().result()
            for future in window:
                future.result()

    def _prefetch_one(self, run: _Run, item: _Item) -> None:
        if run.stop.is_set():
            return
        try:
            data = self._read(item.ref)
            embedded = self.sam.embed(run.model, data, Timings(), Priority.BACKGROUND)
        except ApiError as exc:
            run.fail(item, exc.message)
        except FileNotFoundError:
            run.fail(item, f"The file {item.name!r} does not exist.")
        except OSError as exc:
            run.fail(item, f"The file {item.name!r} cannot be read ({exc.strerror or exc}).")
        except Exception as exc:  # a decoder's or encoder's own bug: the image fails, the run goes on
            if run.stop.is_set():  # the encoder shut down under a cancelled run: the item stays pending
                return
            log.exception("prefetch %s: item %d (%s) failed", run.id, item.index, item.name)
            run.fail(item, f"The image could not be embedded ({exc}).")
        else:
            run.record(embedded.cached)

    def _read(self, ref: ImageRef | str) -> bytes:
        if isinstance(ref, ImageRef):
            return asyncio.run(read_image_ref(ref, self.settings))
        # A job source's reference, read as the job engine reads it.
        scheme = urlsplit(ref).scheme.lower() if "://" in ref else ""
        if scheme in ("", "file"):
            return Path(unquote(urlsplit(ref).path) if scheme else ref).read_bytes()
        reader = READERS.get(scheme)
        if reader is None:
            raise ApiError(400, "unsupported_url", f"URL scheme {scheme!r} is not supported.")
        return asyncio.run(reader(ref, self.settings))

    def _forget_finished(self) -> None:
        with self._lock:
            finished = [run_id for run_id, run in self._runs.items() if not run.active]
            for run_id in finished[: max(len(finished) - FINISHED_KEPT, 0)]:
                del self._runs[run_id]


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
