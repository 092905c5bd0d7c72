"""Running a video job: decode → detection in batches → tracker frame by frame, with checkpoints.

Frames are decoded in order (by a reader thread when the engine has readers, else inline), detected
`batch_size` at a time, and fed to the tracker one by one. Results and the tracker's state are committed in
one transaction about every `job_checkpoint_s` seconds, always after a whole batch: a crash loses at most
that much work, and resuming restores the tracker as it stood after the last committed frame and decodes on
from just after that frame. Batches are counted from the job's first frame, so a resumed job forms the same
batches, gets the same detections and the same tracks as an uninterrupted run: the same output, byte for
byte.

A frame that cannot be decoded stops decoding: it and the frames after it fail with the decoder's reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from models.detector import Detector, run_detection
from models.multi_tracker import TRACKED_TASKS, MultiTracker
from models.yolo import configure_offline
from server.errors import ApiError
from server.formats.stored import shape_to_dict
from server.inputs.video import Position, VideoDecodeError, decode, fetch
from server.jobs.control import JobControl, JobFailed
from server.jobs.handoff import Handoff, lower_priority
from server.jobs.spec import JobSpec
from server.jobs.store import Checkpoint, JobStore, Outcome
from server.settings import Settings

log = logging.getLogger("labelserve.jobs")


class Control(Protocol):
    """The engine's handle on the running job."""

    stop: threading.Event
    processed: int

    def halt(self, reason: str) -> None: ...


class VideoJobFailed(Exception):
    """The job cannot go on (a detector error, a checkpoint that cannot be restored); pending frames stay
    pending, to be retried on resume."""


@dataclass(frozen=True)
class _Frame:
    index: int  # the item
    number: int  # the video's frame number
    pts: int | None
    image: np.ndarray


@dataclass(frozen=True)
class _Stopped:
    """Decoding ended before item `index`: the video is shorter than counted, or cannot be decoded."""

    index: int
    reason: str


def process_video(
    store: JobStore,
    job_id: str,
    spec: JobSpec,
    detector: Detector,
    control: JobControl,
    settings: Settings,
    read_ahead: int,
) -> None:
    """The engine's run of a video job: the video fetched (a remote one copied under the data directory),
    then run_video_job. JobFailed when it cannot go on."""
    assert spec.source.video is not None
    if detector.info.task not in TRACKED_TASKS:  # the model was replaced since submit
        raise JobFailed(f"{spec.detector!r} is now a {detector.info.task} model, which is not tracked")
    configure_offline(settings.data_dir / "ultralytics")  # before ultralytics' trackers load
    try:
        video = fetch(spec.source.video, settings)
    except ApiError as exc:
        raise JobFailed(f"the video cannot be fetched: {exc.message}") from None
    if not video.is_file():
        raise JobFailed(f"the video {spec.source.video} no longer exists")
    control.started = time.monotonic()
    try:
        run_video_job(store, job_id, spec, detector, video, control, read_ahead, settings.job_checkpoint_s)
    except VideoJobFailed as exc:
        raise JobFailed(str(exc)) from None


def run_video_job(
    store: JobStore,
    job_id: str,
    spec: JobSpec,
    detector: Detector,
    video: Path,
    control: Control,
    read_ahead: int,
    checkpoint_s: float = 2.0,
) -> None:
    """Process the job's pending frames; returns when none is left, or when stopped (after a checkpoint).
    `read_ahead` > 0 decodes in a thread, that many frames ahead of detection; results are committed with a
    checkpoint about every `checkpoint_s` seconds (0: after every batch)."""
    assert spec.tracker is not None
    first = store.pending(job_id, -1, 1)
    if not first:
        return
    checkpoint = store.checkpoint(job_id)
    after: Position | None = None
    state: bytes | None = None
    if checkpoint is not None:
        if checkpoint.next_index != first[0][0]:
            raise VideoJobFailed(
                f"the tracker checkpoint is at frame item {checkpoint.next_index}, but item {first[0][0]} is "
                "the first pending one; submit the job again"
            )
        after, state = Position(**json.loads(checkpoint.position)), checkpoint.state
        log.info(
            "job %s: resuming at item %d, after frame %d, with the tracker as it was there",
            job_id,
            checkpoint.next_index,
            after.frame,
        )
    elif first[0][0] != 0:
        raise VideoJobFailed("frames were labelled but no tracker checkpoint was kept; submit the job again")
    from models.registry import multi_tracker  # imports torch: only once a video job runs

    try:
        tracker = multi_tracker(spec.tracker, detector.info, state)
    except Exception as exc:  # an ultralytics upgrade can make an old pickle unreadable
        raise VideoJobFailed(
            f"the tracker checkpoint cannot be restored ({exc}); submit the job again"
        ) from None

    frames = _paired(_pending(store, job_id), video, after)
    ahead = _ReadAhead(frames, read_ahead, control.stop) if read_ahead > 0 else contextlib.nullcontext(frames)
    with ahead as source:
        _Run(store, job_id, spec, detector, tracker, control, checkpoint_s).consume(source)


class _Run:
    def __init__(
        self,
        store: JobStore,
        job_id: str,
        spec: JobSpec,
        detector: Detector,
        tracker: MultiTracker,
        control: Control,
        checkpoint_s: float,
    ) -> None:
        self.store, self.job_id, self.spec, self.checkpoint_s = store, job_id, spec, checkpoint_s
        self.detector, self.tracker, self.control = detector, tracker, control
        self.params = spec.params.detect_params()
        self.held: list[Outcome] = []  # results since the last checkpoint
        self.position: Position | None = None
        self.next_index = 0
        self.committed_at = time.monotonic()

    def consume(self, source: Iterator[_Frame | _Stopped]) -> None:
        batch: list[_Frame] = []
        for item in source:
            if isinstance(item, _Stopped):
                self._label(batch)
                self._commit()
                self.store.fail_pending(self.job_id, item.reason)
                return
            batch.append(item)
            if len(batch) < self.spec.batch_size:
                continue
            self._label(batch)
            batch = []
            if self.control.stop.is_set() or time.monotonic() - self.committed_at >= self.checkpoint_s:
                self._commit()
            if self.control.stop.is_set():
                return
        if self.control.stop.is_set():  # the reader gave up midway: leave a partial batch pending, so that
            self._commit()  # the resumed job forms the same batches as an uninterrupted run
            return
        self._label(batch)
        self._commit()

    def _label(self, batch: list[_Frame]) -> None:
        if not batch:
            return
        try:
            found = run_detection(self.detector, [frame.image for frame in batch], self.params)
            if len(found) != len(batch):
                raise RuntimeError(f"it returned {len(found)} results for {len(batch)} frames")
        except Exception as exc:
            raise VideoJobFailed(
                f"the detector failed on frames {batch[0].number}-{batch[-1].number}: {exc}"
            ) from None
        for frame, shapes in zip(batch, found, strict=True):
            tracked = self.tracker.update(frame.image, shapes)
            result = [{"track": t.track_id, **shape_to_dict(t.shape)} for t in tracked]
            height, width = frame.image.shape[:2]
            self.held.append(Outcome(frame.index, width, height, json.dumps(result, separators=(",", ":"))))
            self.position, self.next_index = Position(frame.number, frame.pts), frame.index + 1

    def _commit(self) -> None:
        if not self.held or self.position is None:
            return
        position = json.dumps({"frame": self.position.frame, "pts": self.position.pts})
        checkpoint = Checkpoint(self.next_index, position, self.tracker.snapshot())
        self.store.record(self.job_id, self.held, checkpoint)
        self.control.processed += len(self.held)
        self.held, self.committed_at = [], time.monotonic()
        job = self.store.job(self.job_id)
        if job is None or job.state != "running":  # cancelled, maybe by another process
            self.control.halt("cancel")


def _pending(store: JobStore, job_id: str, page: int = 1024) -> Iterator[tuple[int, int]]:
    """(item index, frame number) of the pending frames, in order."""
    after = -1
    while rows := store.pending(job_id, after, page):
        yield from ((index, int(ref)) for index, ref in rows)
        after = rows[-1][0]


def _paired(
    items: Iterator[tuple[int, int]], video: Path, after: Position | None
) -> Iterator[_Frame | _Stopped]:
    """Each pending item with its decoded frame; a _Stopped, last, when decoding ends before an item."""
    pending = next(items, None)
    if pending is None:
        return
    # The decoder asks, frame by frame, whether to convert: only the next pending item's frame is.
    wanted = [pending[1]]
    last = after.frame if after is not None else -1
    try:
        for frame in decode(video, lambda number: number == wanted[0], after):
            last = frame.number
            if frame.number < wanted[0]:
                continue
            if frame.number > wanted[0] or frame.image is None:
                yield _Stopped(pending[0], f"the video has no frame {wanted[0]}")
                return
            yield _Frame(pending[0], frame.number, frame.pts, frame.image)
            pending = next(items, None)
            if pending is None:
                return
            wanted[0] = pending[1]
    except VideoDecodeError as exc:
        yield _Stopped(pending[0], f"the video cannot be decoded from frame {exc.frame} on: {exc.reason}")
        return
    yield _Stopped(pending[0], f"the video ends at frame {last}, before frame {wanted[0]}")


class _ReadAhead:
    """Runs an iterator in a thread, up to `depth` items ahead, at a lower CPU priority than inference."""

    def __init__(self, items: Iterator[_Frame | _Stopped], depth: int, stop: threading.Event) -> None:
        self._items = items
        self._halt = threading.Event()
        self._handoff: Handoff[_Frame | _Stopped] = Handoff(
            depth, lambda: self._halt.is_set() or stop.is_set(), stop
        )
        self._thread = threading.Thread(target=self._read, name="video-reader", daemon=True)

    def __enter__(self) -> Iterator[_Frame | _Stopped]:
        self._thread.start()
        return iter(self._handoff)

    def __exit__(self, *_: object) -> None:
        self._halt.set()
        self._thread.join(timeout=5.0)

    def _read(self) -> None:
        lower_priority()
        try:
            for item in self._items:
                if not self._handoff.put(item):
                    return
        except BaseException as exc:  # re-raised in the consumer
            self._handoff.error = exc
        self._handoff.finish()
