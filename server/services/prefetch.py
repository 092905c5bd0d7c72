"""Prefetch: embeddings of the images an annotator is about to open (the next frames of a CVAT job),
computed in the background so that the first click on them is a cache hit.

One runner thread takes items from the runs one at a time, the most urgent run first (a look-ahead from an
annotator's click before a webhook's whole job before an API run; runs of one priority in order). Two
workers pipeline the items: one reads, hashes and decodes the next image while the other's image is in the
encoder, which always serves interactive requests first (server/services/embeddings/scheduler.py). A run may
carry a key (a CVAT job, say): a second start with the key of an active run joins it instead of starting
another. Runs whose image list needs slow set-up (listing a CVAT task) prepare on a thread of their own,
never the runner's. Run state lives in memory; it is progress reporting, not a record, and a restart forgets
it (the embeddings themselves stay in L2).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.errors import ApiError
from server.inputs.urls import READERS, ImageRef, read_image_ref
from server.lru import ByteLRU
from server.ops.timing import Timings
from server.services.collections import Source
from server.services.embeddings.scheduler import Priority
from server.services.sam import SamService
from server.settings import Settings

log = logging.getLogger("labelserve.prefetch")

PIPELINE_DEPTH = 2  # items in progress per run: one in the encoder, the next one read and decoded
FINISHED_KEPT = 100  # finished runs whose status stays queryable
FAILURES_SHOWN = 20
PREPARE_THREADS = 2  # runs setting up at once (each may wait seconds on CVAT's API)

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
    origin: str = Field(description='Who started it: "api", or the CVAT webhook or look-ahead it serves.')
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


class Urgency(IntEnum):
    """Which run's next item the runner takes first (lowest value)."""

    LOOKAHEAD = 0  # the frames right after the one an annotator is clicking on
    JOB = 1  # a CVAT job that just started (webhook)
    API = 2  # POST /v1/prefetch


@dataclass(frozen=True)
class PrefetchItem:
    index: int
    name: str
    ref: ImageRef | str  # a str is a job source's reference: a local path, a URL, or the run reader's own


Reader = Callable[[ImageRef | str], bytes]


@dataclass(frozen=True)
class Prepared:
    """What a run's set-up found: its items, and how to read them (None: the manager's own reader)."""

    items: list[PrefetchItem]
    reader: Reader | None = None
    close: Callable[[], None] | None = None  # called once the run ends (connections it opened)
    # Image ids of refs embedded before (str refs only): a ref whose embedding is still cached is not read.
    ids: ByteLRU[str] | None = None


@dataclass
class _Run:
    id: str
    model: str
    urgency: Urgency
    key: str | None
    origin: str
    seq: int
    items: list[PrefetchItem] = field(default_factory=list)
    reader: Reader | None = None
    close: Callable[[], None] | None = None
    ids: ByteLRU[str] | None = None
    state: PrefetchState = "queued"
    prepared: bool = False
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    cached: int = 0
    encoded: int = 0
    failures: list[PrefetchFailure] = field(default_factory=list)
    failed: int = 0
    next: int = 0  # the next item to start
    in_flight: int = 0
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

    def fail(self, item: PrefetchItem, error: str) -> None:
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
                origin=self.origin,
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
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self._preparers = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="prefetch-prepare")
        self._runner = threading.Thread(target=self._loop, name="prefetch-runner", daemon=True)
        self._runner.start()

    # -- API -----------------------------------------------------------------------------------------------
    def submit(self, request: PrefetchRequest) -> PrefetchStatus:
        """Validate, expand and queue a run; ApiError when it cannot be (4xx) or the queue is full (503)."""
        self.sam.registry.encoder(request.model)  # unknown (404) or unavailable/loading (503) model
        with self._cond:
            self._check_capacity()  # before a possibly long directory listing, and again to take the slot
        items = self._expand(request)
        run, _ = self.start(request.model, Prepared(items), Urgency.API, origin="api")
        return run

    def start(
        self,
        model: str,
        prepare: Prepared | Callable[[], Prepared],
        urgency: Urgency,
        *,
        origin: str,
        key: str | None = None,
    ) -> tuple[PrefetchStatus, bool]:
        """Queue a run. `prepare` is its items, or a function finding them (run on a set-up thread, its
        ApiError failing the run). With the `key` of an active run, that run is returned instead; the bool
        says whether a new run was queued. ApiError 503 when LABELSERVE_PREFETCH_MAX_RUNS are active."""
        with self._cond:
            existing = self._active_with(key)
            if existing is not None:
                return existing.status(), False
            self._check_capacity()
            run = _Run(uuid.uuid4().hex, model, urgency, key, origin, next(self._seq))
            self._runs[run.id] = run
            if isinstance(prepare, Prepared):
                self._set_prepared(run, prepare)
        if not isinstance(prepare, Prepared):
            self._preparers.submit(self._prepare, run, prepare)
        log.info("prefetch %s (%s): queued for %s", run.id, origin, model)
        return run.status(), True

    def status(self, run_id: str) -> PrefetchStatus:
        return self._run(run_id).status()

    def list(self) -> list[PrefetchStatus]:
        """Active runs and the recently finished ones, newest first."""
        with self._cond:
            runs = list(self._runs.values())
        return [run.status() for run in reversed(runs)]

    def cancel(self, run_id: str) -> PrefetchStatus:
        """Items not started are skipped; the (at most two) already being read or encoded finish."""
        run = self._run(run_id)
        with self._cond:
            if not run.active:
                raise ApiError(
                    409, "prefetch_finished", f"Prefetch {run_id} is already {run.state}; nothing to cancel."
                )
            self._stop(run)
        return run.status()

    def cancel_keyed(self, prefix: str, spare: str | None = None) -> list[PrefetchStatus]:
        """Cancel the active runs whose key starts with `prefix`, but for the one keyed `spare`."""
        with self._cond:
            runs = [
                r
                for r in self._runs.values()
                if r.active and r.key and r.key.startswith(prefix) and r.key != spare and not r.stop.is_set()
            ]
            for run in runs:
                self._stop(run)
        return [run.status() for run in runs]

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            for run in self._runs.values():
                run.stop.set()
            self._cond.notify_all()
        self._preparers.shutdown(wait=False, cancel_futures=True)
        self._runner.join(timeout)

    # -- submit helpers ------------------------------------------------------------------------------------
    def _active_with(self, key: str | None) -> _Run | None:
        """Call with self._cond held."""
        if key is None:
            return None
        return next(
            (r for r in self._runs.values() if r.key == key and r.active and not r.stop.is_set()), None
        )

    def _check_capacity(self) -> None:
        """Call with self._cond held."""
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

    def _expand(self, request: PrefetchRequest) -> list[PrefetchItem]:
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
        return [PrefetchItem(index, name, ref) for index, (ref, name) in enumerate(entries)]

    def _run(self, run_id: str) -> _Run:
        with self._cond:
            run = self._runs.get(run_id)
        if run is None:
            raise ApiError(
                404,
                "unknown_prefetch",
                f"No prefetch run {run_id!r}; it never existed, or finished long ago "
                f"(the last {FINISHED_KEPT} finished runs are kept).",
            )
        return run

    # -- the run's life ------------------------------------------------------------------------------------
    def _prepare(self, run: _Run, prepare: Callable[[], Prepared]) -> None:
        try:
            prepared = prepare()
        except Exception as exc:
            if not isinstance(exc, ApiError):  # a bug: this run fails, the manager lives on
                log.exception("prefetch %s: set-up failed", run.id)
            with self._cond:
                if run.active:
                    message = exc.message if isinstance(exc, ApiError) else f"internal error: {exc}"
                    self._finish(run, "failed", message)
            return
        with self._cond:
            if run.active:
                self._set_prepared(run, prepared)
                self._end_if_idle(run)
                return
        if prepared.close is not None:  # cancelled while it was being set up
            with contextlib.suppress(Exception):
                prepared.close()

    def _set_prepared(self, run: _Run, prepared: Prepared) -> None:
        """Call with self._cond held."""
        run.items = prepared.items[: self.settings.prefetch_max_images]
        run.reader, run.close, run.ids, run.prepared = prepared.reader, prepared.close, prepared.ids, True
        self._cond.notify_all()

    def _stop(self, run: _Run) -> None:
        """Call with self._cond held: a queued run ends now, a running one once its items in flight end."""
        run.stop.set()
        self._end_if_idle(run)

    def _end_if_idle(self, run: _Run) -> None:
        """Call with self._cond held: end a cancelled run, or a finished one, once nothing is in flight."""
        if not run.active or run.in_flight:
            return
        if run.stop.is_set():
            self._finish(run, "cancelled")
        elif run.prepared and run.next >= len(run.items):
            self._finish(run, "completed")

    def _finish(self, run: _Run, state: PrefetchState, error: str | None = None) -> None:
        run.end(state, error)
        if run.close is not None:
            with contextlib.suppress(Exception):
                run.close()
        status = run.status()
        log.info("prefetch %s %s: %d done, %d failed", run.id, status.state, status.done, status.failed)
        with self._cond:
            finished = [run_id for run_id, r in self._runs.items() if not r.active]
            for run_id in finished[: max(len(finished) - FINISHED_KEPT, 0)]:
                del self._runs[run_id]
            self._cond.notify_all()

    def _take(self, wait: bool) -> tuple[_Run, PrefetchItem] | None:
        """The next item of the most urgent run; None when closed, or when nothing is ready and not `wait`."""
        with self._cond:
            while not self._closed:
                ready = [
                    run
                    for run in self._runs.values()
                    if run.active and run.prepared and not run.stop.is_set() and run.next < len(run.items)
                ]
                for run in list(self._runs.values()):
                    self._end_if_idle(run)  # prepared empty, or cancelled while queued
                if ready:
                    run = min(ready, key=lambda r: (r.urgency, r.seq))
                    item = run.items[run.next]
                    run.next += 1
                    run.in_flight += 1
                    if run.state == "queued":
                        with run.lock:
                            run.state, run.started = "running", time.time()
                    return run, item
                if not wait:
                    return None
                self._cond.wait()
            return None

    def _loop(self) -> None:
        with ThreadPoolExecutor(PIPELINE_DEPTH, thread_name_prefix="prefetch") as pool:
            window: deque[Future[None]] = deque()
            while True:
                picked = self._take(wait=not window)
                if picked is None:
                    if self._closed:
                        break
                    window.popleft().result()  # nothing ready: let the oldest item in flight end
                    continue
                window.append(pool.submit(self._prefetch_one, *picked))
                if len(window) >= PIPELINE_DEPTH:
                    window.popleft().result()
            for future in window:
                future.result()

    def _prefetch_one(self, run: _Run, item: PrefetchItem) -> None:
        try:
            if not run.stop.is_set():
                self._embed_one(run, item)
        finally:
            with self._cond:
                run.in_flight -= 1
                self._end_if_idle(run)

    def _embed_one(self, run: _Run, item: PrefetchItem) -> None:
        known = (
            run.ids.get(item.ref, count=False) if run.ids is not None and isinstance(item.ref, str) else None
        )
        if known is not None and self.sam.is_cached(run.model, known, kind=None):
            run.record(cached=True)
            return
        try:
            data = (run.reader or self._read)(item.ref)
            embedded = self.sam.embed(run.model, data, Timings(), Priority.BACKGROUND, kind=None)
            if run.ids is not None and isinstance(item.ref, str):
                run.ids.put(item.ref, embedded.image_id)
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


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
