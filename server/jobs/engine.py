"""Running jobs: the Engine interface, and LocalEngine, which runs them on threads in this process.

A job's images are enumerated once, at submit, into the store. Running a job means processing its pending
items: reader threads read and decode ahead of inference through a bounded queue, the detector runs on
batches of `batch_size`, and each batch's results are committed in one transaction. So a crash loses at most
the batches in flight, and resuming processes only what is still pending. When no item is pending the
output is written from the stored results in item order, which makes a resumed job's output byte-identical
to an uninterrupted run's. A CVAT task output is uploaded after that, in chunks the store keeps track of
(server.jobs.cvat_upload), so a resumed upload neither repeats nor misses annotations.

A video source runs differently (server.jobs.video_job): its frames are decoded in order and tracked, and the
tracker's state is checkpointed with the results, so that a resumed job's tracks are an uninterrupted run's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import numpy as np
from pydantic import BaseModel, Field

from models.detector import Detector, DetectorInfo, DetectParams, run_detection, tiling_problem
from models.shapes import Shape
from models.yolo import configure_offline
from server.errors import ApiError
from server.formats.datasets import write_output, write_video_output
from server.formats.files import ImageResult, check_names, output_paths
from server.formats.stored import shape_from_dict, shape_to_dict
from server.formats.tracks import FrameTracks, VideoMeta
from server.images import decode_image
from server.jobs import cvat_task as cvat
from server.jobs.cvat_spec import CvatTaskOutput
from server.jobs.handoff import Handoff, lower_priority
from server.jobs.spec import VIDEO_FORMATS, JobSpec
from server.jobs.store import ACTIVE_STATES, JobRow, JobState, JobStore, Outcome
from server.jobs.tracking import TRACKED_TASKS
from server.jobs.video_job import VideoJobFailed, run_video_job
from server.jobs.video_source import copy_path, fetch, local_path, probe
from server.objectstore.locations import is_s3_url, parse_s3_url
from server.objectstore.store import store_for
from server.settings import Settings, get_settings
from server.sources import READERS

log = logging.getLogger("labelserve.jobs")

GetDetector = Callable[[str], Detector]
Read = Callable[[str], bytes]  # an item's ref → its bytes
# (SAM model name, image bytes, decoded RGB image, detections) -> refined shapes
Refine = Callable[[str, bytes, np.ndarray, list[Shape]], list[Shape]]

T = TypeVar("T")

FAILURES_SHOWN = 20  # failed items listed in a job's status
FAILED_BATCHES_LIMIT = 3  # batches in a row on which the detector fails every image: the job fails
STAGING_DIR = "job-outputs"  # under data_dir: the files of s3:// outputs, until they are uploaded


class ItemFailure(BaseModel):
    index: int
    image: str
    error: str


class CvatUploadStatus(BaseModel):
    task: str = Field(description="The CVAT task's page.")
    uploaded_images: int = Field(description="Images whose annotations CVAT acknowledged.")
    shapes: int
    tags: int
    skipped: int = Field(
        description="Detections left out: label mapped to nothing, or a kind the CVAT label cannot hold."
    )


class JobStatus(BaseModel):
    id: str
    state: JobState
    spec: JobSpec
    created_at: str = Field(description="ISO 8601, UTC.")
    started_at: str | None = Field(description="When it first started running.")
    finished_at: str | None
    error: str | None = Field(description="Why the job failed (not why single images failed).")
    total: int = Field(description="Images in the source (for a video: frames in its range).")
    done: int = Field(description="Images labelled.")
    failed: int = Field(description="Images that could not be read, decoded or detected; see failures.")
    pending: int
    images_per_second: float | None = Field(description="This run's throughput (since it last started).")
    eta_seconds: float | None = Field(description="Pending images at that throughput; while running.")
    outputs: list[str] = Field(
        description="The files written, and the CVAT task uploaded to, once completed."
    )
    failures: list[ItemFailure] = Field(description=f"The first {FAILURES_SHOWN} failed images, in order.")
    cvat_upload: CvatUploadStatus | None = Field(
        default=None, description="Progress of the upload into a CVAT task, once it has started."
    )


class Engine(Protocol):
    """What the routes need from an execution engine: this one, or a distributed one running the same spec."""

    def submit(self, spec: JobSpec) -> JobStatus: ...

    def cancel(self, job_id: str) -> JobStatus: ...

    def status(self, job_id: str) -> JobStatus: ...

    def resume_unfinished(self) -> list[str]: ...

    def resume(self, job_id: str, credentials: JobSpec | None = None) -> JobStatus: ...

    def list(self, state: JobState | None = None, limit: int = 100) -> list[JobStatus]: ...


@dataclass
class _Control:
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


@dataclass
class _Loaded:
    index: int
    image: np.ndarray | None = None
    data: bytes | None = None  # kept only when SAM refinement needs the bytes
    error: str | None = None


class _JobFailed(Exception):
    pass


class LocalEngine:
    """Runs jobs on threads: `concurrency` jobs at a time (one by default: jobs share the accelerator),
    each with `readers` reader/decoder threads keeping up to `prefetch` decoded images ahead of inference.

    - `get_detector(name)` gives a Detector; for a bad name it raises ApiError, LookupError or the registry's
      errors (UnknownModel → 404, ModelUnavailable → 503; ModelLoading → 503 at submit, waited out when
      resuming).
    - `refine(sam_model, image_bytes, image, shapes)` turns detections into SAM masks for jobs with
      `sam_refine`; `check_refine(sam_model)` (raising like get_detector) validates that name at submit.
    - `settings` gives max_image_pixels, polygon_tolerance, the URL fetch settings, the storage profiles of
      s3:// sources and outputs, and data_dir, where s3:// outputs are staged before their upload.

    Call `resume_unfinished()` at start-up and `close()` at shutdown; a job stopped by `close()` goes back to
    queued and the next `resume_unfinished()` continues it.
    """

    def __init__(
        self,
        get_detector: GetDetector,
        refine: Refine | None = None,
        *,
        state_db: Path | str,
        settings: Settings | None = None,
        prefetch: int = 16,
        readers: int = 4,
        concurrency: int = 1,
        check_refine: Callable[[str], object] | None = None,
    ) -> None:
        self._get_detector = get_detector
        self._refine = refine
        self._check_refine = check_refine
        self._settings = settings or get_settings()
        self._prefetch = max(prefetch, 1)
        self._readers = max(readers, 1)
        self.store = JobStore(state_db)
        self._purge_old_jobs()
        self._lock = threading.Lock()
        self._active: dict[str, _Control] = {}
        self._last_rate: dict[str, float] = {}
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._workers = [
            threading.Thread(target=self._work, name=f"job-worker-{i}", daemon=True)
            for i in range(max(concurrency, 1))
        ]
        for worker in self._workers:
            worker.start()

    def _purge_old_jobs(self) -> None:
        days = self._settings.job_retention_days
        if days > 0:
            purged = self.store.purge_finished(time.time() - days * 86400)
            if purged:
                log.info("deleted %d jobs finished more than %g days ago (job_retention_days)", purged, days)

    # -- the Engine interface ------------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> JobStatus:
        """Validate everything that can be checked now (ApiError otherwise), store the job, queue it."""
        self._purge_old_jobs()
        detector = self.detector(spec.detector)
        info = detector.info
        unknown = sorted(set(spec.params.classes or ()) - set(info.class_names))
        if unknown:
            raise ApiError(
                422,
                "unknown_class",
                f"Detector {spec.detector!r} has no class ids {unknown}; it has {sorted(info.class_names)}.",
            )
        if spec.source.video is not None and info.task not in TRACKED_TASKS:
            raise ApiError(
                422,
                "unsupported_detector",
                f"{spec.detector!r} is a {info.task} model; video jobs track the boxes or masks of "
                f"{' and '.join(TRACKED_TASKS)} models.",
            )
        if problem := tiling_problem(info, spec.params.detect_params()):
            raise ApiError(422, "unsupported_tiling", problem)
        if info.task == "classify" and spec.output.format not in (None, "cvat_images"):
            raise ApiError(
                422,
                "unsupported_output",
                f"{spec.detector!r} classifies whole images (tags), which {spec.output.format} cannot hold; "
                "use the cvat_images format.",
            )
        if spec.sam_refine is not None:
            if self._refine is None:
                raise ApiError(422, "refine_unavailable", "SAM refinement is not available on this server.")
            if self._check_refine is not None:
                _model_call(spec.sam_refine, self._check_refine)
        if spec.output.directory is not None:
            self._check_output(spec.output.directory)
        self._check_destinations(spec)
        entries = (
            self._cvat_checked_entries(spec, info)
            if spec.uses_cvat()
            else spec.source.enumerate(self._settings)
        )
        if spec.output.format is not None:
            check_names(spec.output.format, (name for _, name in entries))

        job_id = uuid.uuid4().hex
        secrets = spec.secrets()
        # The spec's JSON has the credentials redacted; the real ones are kept apart until the job completes.
        stored = spec.model_dump_json()
        total = self.store.create_job(
            job_id, stored, entries, time.time(), json.dumps(secrets) if secrets else None
        )
        log.info("job %s: %d images, %s -> %s", job_id, total, spec.detector, ", ".join(_destinations(spec)))
        self._enqueue(job_id)
        return self.status(job_id)

    def cancel(self, job_id: str) -> JobStatus:
        row = self._row(job_id)
        if row.state not in ACTIVE_STATES or not self.store.transition(
            job_id, "cancelled", only_from=ACTIVE_STATES, now=time.time()
        ):
            state = self._row(job_id).state
            raise ApiError(
                409,
                "job_finished",
                f"Job {job_id} is already {state}; only queued or running jobs can be cancelled.",
            )
        self.store.set_secrets(job_id, None)
        with self._lock:
            control = self._active.get(job_id)
        if control is not None:
            control.halt("cancel")
        log.info("job %s cancelled", job_id)
        return self.status(job_id)

    def status(self, job_id: str) -> JobStatus:
        return self._status(self._row(job_id))

    def resume_unfinished(self) -> list[str]:
        """Queue every queued or running job (oldest first); finished items are not redone."""
        ids = [row.id for row in self.store.jobs(ACTIVE_STATES, oldest_first=True)]
        for job_id in ids:
            self._enqueue(job_id)
        return ids

    def resume(self, job_id: str, credentials: JobSpec | None = None) -> JobStatus:
        """Run a failed, cancelled or interrupted job again from where it stopped; `credentials`, a spec with
        the job's CVAT credentials, replaces the stored ones (a cancelled job's are forgotten)."""
        row = self._row(job_id)
        if row.state == "completed":
            raise ApiError(409, "job_finished", f"Job {job_id} is already completed.")
        if credentials is not None and credentials.secrets():
            self.store.set_secrets(job_id, json.dumps(credentials.secrets()))
        self.store.transition(job_id, "queued", only_from=("failed", "cancelled"))
        self._enqueue(job_id)
        return self.status(job_id)

    def close(self, timeout: float = 10.0) -> None:
        """Stop running jobs (they go back to queued, to be resumed) and the worker threads."""
        with self._lock:
            controls = list(self._active.values())
        for control in controls:
            control.halt("shutdown")
        for _ in self._workers:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(deadline - time.monotonic(), 0))
        self.store.close()

    def detector(self, name: str) -> Detector:
        """The named detector, with lookup errors as ApiErrors (404 unknown, 503 unavailable or loading)."""
        return _model_call(name, self._get_detector)

    def list(self, state: JobState | None = None, limit: int = 100) -> list[JobStatus]:
        rows = self.store.jobs([state] if state else None, limit=limit)
        return [self._status(row) for row in rows]

    # -- status ----------------------------------------------------------------------------------------------

    def _row(self, job_id: str) -> JobRow:
        row = self.store.job(job_id)
        if row is None:
            raise ApiError(404, "unknown_job", f"No job {job_id!r}; GET /v1/jobs lists the jobs.")
        return row

    def _status(self, row: JobRow) -> JobStatus:
        spec = JobSpec.model_validate_json(row.spec)
        pending = row.total - row.done - row.failed
        with self._lock:
            control = self._active.get(row.id)
            rate = control.rate() if control is not None else self._last_rate.get(row.id)
        running = row.state == "running"
        eta = round(pending / rate, 1) if running and rate else None
        outputs = output_locations(spec) if row.state == "completed" else []
        upload = self.store.upload(row.id) if spec.output.cvat_task is not None else None
        if row.state == "completed" and spec.output.cvat_task is not None:
            outputs.append(self._task_page(spec.output.cvat_task))
        failures = self.store.failures(row.id, FAILURES_SHOWN) if row.failed else []
        return JobStatus(
            id=row.id,
            state=row.state,
            spec=spec,
            created_at=_iso(row.created),
            started_at=_iso(row.started),
            finished_at=_iso(row.finished),
            error=row.error,
            total=row.total,
            done=row.done,
            failed=row.failed,
            pending=pending,
            images_per_second=round(rate, 2) if rate else None,
            eta_seconds=eta,
            outputs=outputs,
            failures=[ItemFailure(index=f.index, image=f.name, error=f.error or "") for f in failures],
            cvat_upload=CvatUploadStatus(
                task=self._task_page(spec.output.cvat_task),
                uploaded_images=self.store.done_through(row.id, upload.confirmed),
                shapes=upload.shapes,
                tags=upload.tags,
                skipped=upload.skipped,
            )
            if upload is not None and spec.output.cvat_task is not None
            else None,
        )

    def _task_page(self, task: CvatTaskOutput) -> str:
        profile = self._settings.cvat_profiles.get(task.profile) if task.profile else None
        url = task.url or (profile.url if profile is not None else f"profile {task.profile}")
        return f"{url.rstrip('/')}/tasks/{task.task_id}"

    # -- running -------------------------------------------------------------------------------------------

    def _check_output(self, directory: str) -> None:
        if is_s3_url(directory):
            store_for(self._settings).check_writable(directory)
        else:
            try:
                Path(directory).mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryFile(dir=directory):
                    pass
            except OSError as exc:
                raise ApiError(
                    400,
                    "output_not_writable",
                    f"The output directory {directory!r} cannot be written ({exc.strerror or exc}).",
                ) from None

    def _check_destinations(self, spec: JobSpec) -> None:
        """Two running jobs never write the same directory or upload into the same CVAT task."""
        mine = _destinations(spec)
        for row in self.store.jobs(ACTIVE_STATES):
            shared = mine & _destinations(JobSpec.model_validate_json(row.spec))
            if shared:
                raise ApiError(
                    409,
                    "output_in_use",
                    f"Job {row.id} is still writing to {sorted(shared)[0]}; pick another.",
                )

    def _cvat_checked_entries(self, spec: JobSpec, info: DetectorInfo) -> list[tuple[str, str]]:
        """The source's entries, after connecting to the CVAT tasks and checking the output task's labels
        and that every image has a frame in it (ApiError otherwise): nothing is stored before that holds."""
        with cvat.Connections(self._settings) as connections:
            source, output = spec.source.cvat_task, spec.output.cvat_task
            prepared = cvat.prepare(connections, info, spec.sam_refine, spec.params.classes, source, output)
            entries = (
                prepared.entries if prepared.entries is not None else spec.source.enumerate(self._settings)
            )
            if output is not None and prepared.output is not None and not output.same_task(source):
                cvat.match_frames((name for _, name in entries), prepared.output)
        return entries

    def _enqueue(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._active:
                return
            self._active[job_id] = _Control()
        self._queue.put(job_id)

    def _work(self) -> None:
        while (job_id := self._queue.get()) is not None:
            with self._lock:
                control = self._active[job_id]
            try:
                self._run(job_id, control)
            except _JobFailed as exc:
                self._fail(job_id, str(exc))
            except Exception as exc:  # a bug: keep the worker alive, and say so in the job
                log.exception("job %s failed", job_id)
                self._fail(job_id, f"internal error: {exc}")
            finally:
                with self._lock:
                    del self._active[job_id]
                    rate = control.rate()
                    if rate:
                        self._last_rate[job_id] = rate

    def _fail(self, job_id: str, error: str) -> None:
        if self.store.transition(job_id, "failed", only_from=("running",), now=time.time(), error=error):
            log.warning("job %s failed: %s", job_id, error)

    def _run(self, job_id: str, control: _Control) -> None:
        row = self.store.job(job_id)
        if row is None or row.state not in ACTIVE_STATES or control.stop.is_set():
            return
        if not self.store.transition(job_id, "running", only_from=ACTIVE_STATES, now=time.time()):
            return
        spec = JobSpec.model_validate_json(row.spec)
        secrets = self.store.secrets(job_id)
        if secrets is not None:
            spec = spec.with_secrets(json.loads(secrets))
        for task in (spec.source.cvat_task, spec.output.cvat_task):
            if task is not None:  # credentials gone, or a profile removed: fail now, not after every image
                _cvat_step("logging in to CVAT", cvat.Login.of, task, self._settings)
        if spec.sam_refine is not None and self._refine is None:  # resumed by a process without SAM
            raise _JobFailed("the job asks for SAM refinement, which this process does not have")
        with contextlib.ExitStack() as stack:
            connections = stack.enter_context(cvat.Connections(self._settings)) if spec.uses_cvat() else None
            read: Read = self._read
            if connections is not None and spec.source.cvat_task is not None:
                read = _cvat_step("reading the CVAT task", connections.frame_reader, spec.source.cvat_task)
            detector = self._ready_detector(spec.detector, control)
            if detector is not None and spec.source.video is not None:
                self._process_video(job_id, spec, detector, control)
            elif detector is not None:
                self._process(job_id, spec, detector, control, read)
            if control.stop.is_set():
                self._stopped(job_id, control)
                return
            left = self.store.pending(job_id, -1, 1)
            if left:
                raise _JobFailed(f"image {left[0][0]} and maybe others were left unprocessed; resume the job")
            assert detector is not None
            outputs: list[str] = []
            if spec.output.directory is not None:
                self._write_output(job_id, spec, detector.info)
                outputs += output_locations(spec)
            if connections is not None and spec.output.cvat_task is not None:
                if not self._upload(job_id, spec, detector.info, connections, control):
                    self._stopped(job_id, control)
                    return
                outputs.append(self._task_page(spec.output.cvat_task))
        if self.store.transition(job_id, "completed", only_from=("running",), now=time.time()):
            self.store.set_secrets(job_id, None)  # nothing left to do with them
            if spec.source.video is not None:
                self._video_done(job_id, spec.source.video)
            log.info("job %s completed: %s", job_id, ", ".join(outputs))

    def _stopped(self, job_id: str, control: _Control) -> None:
        if control.reason == "shutdown":  # not the user's decision: leave it to be resumed
            self.store.transition(job_id, "queued", only_from=("running",))

    def _upload(
        self, job_id: str, spec: JobSpec, info: DetectorInfo, connections: cvat.Connections, control: _Control
    ) -> bool:
        """Upload the results into the output task (the labels are checked again: the task may have changed
        since submit); False when stopped midway."""
        from server.jobs import cvat_upload  # imports cvat-sdk

        output = spec.output.cvat_task
        assert output is not None
        try:
            task = connections.task(output)
            plan = cvat.plan_labels(info, spec.sam_refine, spec.params.classes, output, task)
            same_task = output.same_task(spec.source.cvat_task)
            frame_of = cvat_upload.frame_lookup(self.store, job_id, task, same_task)
            return cvat_upload.upload(
                self.store,
                job_id,
                task,
                plan,
                frame_of,
                clear_existing=output.clear_existing,
                chunk_size=self._settings.cvat_upload_chunk,
                tolerance=self._settings.polygon_tolerance,
                stopped=control.stop.is_set,
            )
        except ApiError as exc:
            raise _JobFailed(
                f"uploading into the CVAT task failed: {exc.message} The results are kept; resume the job "
                "to retry."
            ) from None

    def _write_output(self, job_id: str, spec: JobSpec, info: DetectorInfo) -> None:
        """Write the output files; an s3:// output is written to a staging folder, then uploaded. Both are
        redone whole when a job fails here and is resumed."""
        target, output_format = spec.output.directory, spec.output.format
        assert target is not None and output_format is not None
        remote = is_s3_url(target)
        directory = self._settings.data_dir / STAGING_DIR / job_id if remote else Path(target)
        try:
            if remote:
                shutil.rmtree(directory, ignore_errors=True)  # no files left from an earlier attempt
            if output_format in VIDEO_FORMATS:
                meta = self._video_meta(job_id, spec)
                write_video_output(output_format, directory, info, lambda: self._tracks(job_id), meta)
            else:
                write_output(
                    output_format,
                    directory,
                    info,
                    lambda: self._results(job_id),
                    self._settings.polygon_tolerance,
                )
            if remote:
                store_for(self._settings).upload_tree(directory, target)
        except OSError as exc:
            raise _JobFailed(f"writing the output failed: {exc}") from None
        except ApiError as exc:
            raise _JobFailed(f"uploading the output failed: {exc.message}") from None
        finally:
            if remote:
                shutil.rmtree(directory, ignore_errors=True)

    def _ready_detector(self, name: str, control: _Control) -> Detector | None:
        """The detector, waiting while it loads (a server resuming jobs at start-up); None when stopped."""
        while not control.stop.is_set():
            try:
                return self.detector(name)
            except ApiError as exc:
                if exc.code != "model_loading":
                    raise _JobFailed(exc.message) from None
            control.stop.wait(2.0)
        return None

    def _process_video(self, job_id: str, spec: JobSpec, detector: Detector, control: _Control) -> None:
        assert spec.source.video is not None
        if detector.info.task not in TRACKED_TASKS:  # the model was replaced since submit
            raise _JobFailed(f"{spec.detector!r} is now a {detector.info.task} model, which is not tracked")
        configure_offline(self._settings.data_dir / "ultralytics")  # before ultralytics' trackers load
        try:
            video = fetch(spec.source.video, self._settings)
        except ApiError as exc:
            raise _JobFailed(f"the video cannot be fetched: {exc.message}") from None
        if not video.is_file():
            raise _JobFailed(f"the video {spec.source.video} no longer exists")
        control.started = time.monotonic()
        read_ahead = self._prefetch if self._readers > 0 else 0
        try:
            run_video_job(self.store, job_id, spec, detector, video, control, read_ahead)
        except VideoJobFailed as exc:
            raise _JobFailed(str(exc)) from None

    def _video_meta(self, job_id: str, spec: JobSpec) -> VideoMeta:
        assert spec.source.video is not None
        frames = spec.source.frames
        start, step = (frames.start, frames.step) if frames is not None else (0, 1)
        total = self._row(job_id).total
        try:
            fps = probe(fetch(spec.source.video, self._settings), "", self._settings.max_image_pixels).fps
        except ApiError:
            fps = None
        name = PurePosixPath(urlsplit(spec.source.video).path).name or "video"
        return VideoMeta(name, total, start, start + (total - 1) * step, step, fps)

    def _video_done(self, job_id: str, video: str) -> None:
        """A completed job is never resumed: drop its tracker state, and its copy of a remote video unless
        another unfinished job reads it."""
        self.store.drop_checkpoint(job_id)
        if local_path(video) is not None:
            return
        active = self.store.jobs(ACTIVE_STATES)
        if video not in (JobSpec.model_validate_json(row.spec).source.video for row in active):
            copy_path(video, self._settings).unlink(missing_ok=True)

    def _process(self, job_id: str, spec: JobSpec, detector: Detector, control: _Control, read: Read) -> None:
        params = spec.params.detect_params()
        control.started = time.monotonic()
        held: list[Outcome] = []  # outcomes of batches where the detector failed on every image
        failed_batches, last_error = 0, ""

        def load(index: int, ref: str) -> _Loaded:
            return self._load(index, ref, read, keep_bytes=spec.sam_refine is not None)

        reader = (
            _Prefetch(self._pending(job_id), load, self._readers, self._prefetch, control.stop)
            if self._readers > 0
            else _Inline(self._pending(job_id), load, control.stop)
        )
        with reader as prefetch:
            for batch in prefetch.batches(spec.batch_size):
                outcomes, detector_error = self._infer(detector, spec, params, batch)
                if detector_error is not None:
                    # Maybe a broken detector rather than bad images: hold these back, and after several
                    # batches in a row fail the job with the items still pending, to be retried on resume.
                    held += outcomes
                    failed_batches, last_error = failed_batches + 1, detector_error
                    if failed_batches >= FAILED_BATCHES_LIMIT:
                        raise _JobFailed(
                            f"the detector failed on {failed_batches} batches in a row: {last_error}"
                        )
                    continue
                self.store.record(job_id, held + outcomes)
                control.processed += len(held) + len(outcomes)
                held, failed_batches = [], 0
                if self.store.job(job_id).state != "running":  # cancelled, maybe by another process
                    control.halt("cancel")
                if control.stop.is_set():
                    return
        if held:
            self.store.record(job_id, held)
            control.processed += len(held)

    def _pending(self, job_id: str, page: int = 512) -> Iterator[tuple[int, str]]:
        after = -1
        while rows := self.store.pending(job_id, after, page):
            yield from rows
            after = rows[-1][0]

    def _infer(
        self, detector: Detector, spec: JobSpec, params: DetectParams, batch: list[_Loaded]
    ) -> tuple[list[Outcome], str | None]:
        """Outcomes of one batch, and the detector's error when it failed on every image of the batch."""
        outcomes = [Outcome(item.index, error=item.error) for item in batch if item.error is not None]
        ready = [item for item in batch if item.error is None]
        if not ready:
            return outcomes, None
        try:
            found = list(zip(ready, _detect(detector, [item.image for item in ready], params), strict=True))
        except Exception:
            # One image can break a whole batch: retry one by one so only that image fails.
            found, error = [], ""
            for item in ready:
                try:
                    found.append((item, _detect(detector, [item.image], params)[0]))
                except Exception as exc:
                    error = f"the detector failed: {exc}"
                    outcomes.append(Outcome(item.index, error=error))
            if not found:
                return outcomes, error
        for item, shapes in found:
            assert item.image is not None
            height, width = item.image.shape[:2]
            if spec.sam_refine is not None:
                assert self._refine is not None and item.data is not None
                try:
                    shapes = self._refine(spec.sam_refine, item.data, item.image, shapes)
                except ApiError as exc:
                    outcomes.append(Outcome(item.index, error=f"SAM refinement failed: {exc.message}"))
                    continue
                except Exception as exc:
                    log.exception("SAM refinement failed on item %d", item.index)
                    outcomes.append(Outcome(item.index, error=f"SAM refinement failed: {exc}"))
                    continue
            result = json.dumps([shape_to_dict(s) for s in shapes], separators=(",", ":"))
            outcomes.append(Outcome(item.index, width, height, result))
        return outcomes, None

    def _load(self, index: int, ref: str, read: Read, keep_bytes: bool) -> _Loaded:
        """Read and decode one image; any problem becomes the item's failure reason, never an exception."""
        try:
            data = read(ref)
            image = decode_image(data, self._settings.max_image_pixels)
        except ApiError as exc:
            return _Loaded(index, error=exc.message)
        except FileNotFoundError:
            return _Loaded(index, error=f"The file {ref!r} does not exist.")
        except OSError as exc:
            return _Loaded(index, error=f"The file {ref!r} cannot be read ({exc.strerror or exc}).")
        except Exception as exc:  # a decoder's own bug: the image fails, the job goes on
            log.exception("decoding item %d (%s) failed", index, ref)
            return _Loaded(index, error=f"The image could not be decoded ({exc}).")
        return _Loaded(index, image, data if keep_bytes else None)

    def _read(self, ref: str) -> bytes:
        scheme = urlsplit(ref).scheme.lower() if "://" in ref else ""
        if scheme in ("", "file"):
            return Path(unquote(urlsplit(ref).path) if scheme else ref).read_bytes()
        reader = READERS.get(scheme)
        if reader is None:
            raise ApiError(400, "unsupported_url", f"URL scheme {scheme!r} is not supported.")
        return asyncio.run(reader(ref, self._settings, purpose="job"))

    def _tracks(self, job_id: str) -> Iterator[FrameTracks]:
        for item in self.store.items(job_id, status="done"):
            assert item.width is not None and item.height is not None and item.result is not None
            objects = [(d.pop("track"), shape_from_dict(d)) for d in json.loads(item.result)]
            yield FrameTracks(item.index, int(item.ref), item.width, item.height, objects)

    def _results(self, job_id: str) -> Iterator[ImageResult]:
        for item in self.store.items(job_id, status="done"):
            assert item.width is not None and item.height is not None and item.result is not None
            shapes = [shape_from_dict(d) for d in json.loads(item.result)]
            yield ImageResult(item.index, item.name, item.width, item.height, shapes)


def output_locations(spec: JobSpec) -> list[str]:
    """The files (or folder, for YOLO labels) a completed job wrote: local paths or s3:// URLs."""
    target, output_format = spec.output.directory, spec.output.format
    if target is None or output_format is None:
        return []
    if is_s3_url(target):
        folder = parse_s3_url(target, folder=True)
        names = [p.as_posix() for p in output_paths(output_format, Path())]  # "gt/gt.txt" keeps its folder
        return [f"s3://{folder.bucket}/{folder.key}{name}" for name in names]
    return [str(p) for p in output_paths(output_format, Path(target))]


def _destinations(spec: JobSpec) -> set[str]:
    found = set(spec.output.destinations())
    directory = spec.output.directory
    if directory is not None:  # the same directory however it is spelled
        found.discard(directory)
        if is_s3_url(directory):
            folder = parse_s3_url(directory, folder=True)
            found.add(f"s3://{folder.bucket}/{folder.key}")
        else:
            found.add(repr(str(Path(directory).resolve())))
    return found


def _cvat_step(doing: str, step: Callable[..., T], *args: object) -> T:
    """A CVAT call while a job runs: its ApiError fails the job with the message."""
    try:
        return step(*args)
    except ApiError as exc:
        raise _JobFailed(f"{doing} failed: {exc.message}") from None


def _model_call(name: str, lookup: Callable[[str], T]) -> T:
    try:
        return lookup(name)
    except ApiError:
        raise
    except Exception as exc:
        error = _lookup_error(name, exc)
        if error is None:
            raise
        raise error from None


def _lookup_error(name: str, exc: Exception) -> ApiError | None:
    """The registry's errors (models.base) as ApiErrors. Looked up in sys.modules rather than imported:
    models.base pulls in torch, and if it was never imported none of its errors can have been raised."""
    if isinstance(exc, LookupError):
        return ApiError(404, "unknown_model", f"There is no model named {name!r}.")
    base = sys.modules.get("models.base")
    if base is None:
        return None
    if isinstance(exc, base.UnknownModel):
        return ApiError(404, "unknown_model", str(exc))
    if isinstance(exc, base.ModelLoading):
        return ApiError(503, "model_loading", str(exc), headers={"Retry-After": "5"})
    if isinstance(exc, base.ModelUnavailable):
        return ApiError(503, "model_unavailable", f"{exc} Fix: {exc.fix}" if exc.fix else str(exc))
    return None


def _detect(detector: Detector, images: list[np.ndarray | None], params: DetectParams) -> list[list[Shape]]:
    found = run_detection(detector, images, params)  # type: ignore[arg-type]
    if len(found) != len(images):
        raise RuntimeError(f"the detector returned {len(found)} results for {len(images)} images")
    return found


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Inline:
    """Reading and decoding in the inference thread: on a CPU whose cores inference already fills, reader
    threads only slow it down (readers = 0)."""

    def __init__(
        self, refs: Iterator[tuple[int, str]], load: Callable[[int, str], _Loaded], stop: threading.Event
    ):
        self._refs, self._load, self._stop = refs, load, stop

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def batches(self, size: int) -> Iterator[list[_Loaded]]:
        batch: list[_Loaded] = []
        for ref in self._refs:
            if self._stop.is_set():
                return
            batch.append(self._load(*ref))
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch


class _Prefetch:
    """Reader threads pulling (index, ref) from a shared iterator, loading each into a bounded queue."""

    def __init__(
        self,
        refs: Iterator[tuple[int, str]],
        load: Callable[[int, str], _Loaded],
        readers: int,
        depth: int,
        stop: threading.Event,
    ) -> None:
        self._refs, self._load, self._stop = refs, load, stop
        self._halt = threading.Event()  # ours: set on exit, whatever the reason
        self._lock = threading.Lock()
        # Readers finish out of order; batches are built in item order, so the same items always share a
        # batch (detector numerics depend on batch composition, and a resumed job must equal a straight run).
        # The window bounds how far readers run ahead of the first item not yet handed out.
        self._window = threading.Semaphore(depth)
        self._next_seq = 0
        self._handoff: Handoff[tuple[int, _Loaded]] = Handoff(depth + readers, self._stopped, stop)
        self._alive = readers
        self._threads = [
            threading.Thread(target=self._read, name=f"job-reader-{i}", daemon=True) for i in range(readers)
        ]

    def __enter__(self) -> _Prefetch:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._halt.set()
        for thread in self._threads:
            thread.join(timeout=1.0)  # a reader stuck on a slow URL finishes on its own (daemon)

    def _stopped(self) -> bool:
        return self._halt.is_set() or self._stop.is_set()

    def _read(self) -> None:
        lower_priority()
        try:
            while not self._stopped():
                if not self._window.acquire(timeout=0.1):
                    continue
                with self._lock:
                    nxt = next(self._refs, None)
                    seq = self._next_seq
                    self._next_seq += 1
                if nxt is None:
                    self._window.release()
                    break
                if not self._handoff.put((seq, self._load(*nxt))):
                    return
        except BaseException as exc:  # the store failed under us: the consumer re-raises it
            self._handoff.error = exc
        finally:
            with self._lock:
                self._alive -= 1
                last = self._alive == 0
            if last:
                self._handoff.finish()

    def batches(self, size: int) -> Iterator[list[_Loaded]]:
        batch: list[_Loaded] = []
        arrived: dict[int, _Loaded] = {}
        expected = 0
        for seq, item in self._handoff:
            arrived[seq] = item
            while expected in arrived:
                batch.append(arrived.pop(expected))
                expected += 1
                self._window.release()
                if len(batch) == size:
                    yield batch
                    batch = []
        if self._handoff.finished:  # every reader is done (the job was not stopped): the rest, in item order
            batch += [arrived[seq] for seq in sorted(arrived)]
            for start in range(0, len(batch), size):
                yield batch[start : start + size]
