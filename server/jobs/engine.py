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

A job whose spec says `"engine": "ray"` goes through all of this too, in this process (the driver); only its
detection runs elsewhere, on Ray Data actors, through the RayJobs given to LocalEngine (server.scale.batch).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from models.concept_detector import ConceptDetector
from models.detector import Detector
from server.cvat import tasks as cvat
from server.errors import ApiError
from server.formats.annotations import AnnotatedImage
from server.formats.files import check_names
from server.inputs.urls import read
from server.inputs.video import copy_path, local_path
from server.jobs.control import JobControl, JobFailed
from server.jobs.corrections import CorrectionsRequest, corrections_report
from server.jobs.image_job import Embed, ImageRun, Read, Refine
from server.jobs.outputs import output_locations, upload_to_cvat, write_files
from server.jobs.review_job import annotated_items, review_entries, write_review
from server.jobs.sample_job import check_budget, check_new_task, write_sample
from server.jobs.spec import JobSpec
from server.jobs.status import JobStatus, job_status, task_page
from server.jobs.store import ACTIVE_STATES, JobRow, JobState, JobStore
from server.jobs.validate import (
    check_destinations,
    check_output,
    check_spec,
    cvat_checked_entries,
    destinations,
    model_call,
)
from server.jobs.video_job import process_video
from server.settings import Settings, get_settings

log = logging.getLogger("labelserve.jobs")

GetDetector = Callable[[str], Detector]

T = TypeVar("T")


class RayJobs(Protocol):
    """The Ray Data engine for `"engine": "ray"` jobs (server/scale/batch.py), given to LocalEngine by the
    composition root, so that jobs/ imports no Ray. Everything but the detection runs here as for a local
    job: validation, the store, outputs, the CVAT upload."""

    def process_images(self, run: ImageRun) -> None:
        """Process the run's pending items on an actor pool, committing each batch through the run's store;
        returns when none is left or the run's control is stopped (JobFailed as ImageRun.process)."""
        ...

    def video_detector(self, spec: JobSpec, local: Detector) -> Detector:
        """A Detector with `local`'s info whose detect() runs on a Ray actor (a video's frames are tracked
        in order in this process)."""
        ...


class Engine(Protocol):
    """What the routes need from an execution engine: this one, or a distributed one running the same spec."""

    def submit(self, spec: JobSpec) -> JobStatus: ...

    def cancel(self, job_id: str) -> JobStatus: ...

    def status(self, job_id: str) -> JobStatus: ...

    def resume_unfinished(self) -> list[str]: ...

    def resume(self, job_id: str, credentials: JobSpec | None = None) -> JobStatus: ...

    def list(self, state: JobState | None = None, limit: int = 100) -> list[JobStatus]: ...

    def corrections(self, request: CorrectionsRequest) -> dict[str, Any]: ...


class LocalEngine:
    """Runs jobs on threads: `concurrency` jobs at a time (one by default: jobs share the accelerator),
    each with `readers` reader/decoder threads keeping up to `prefetch` decoded images ahead of inference.

    - `get_detector(name)` gives a Detector; for a bad name it raises ApiError, LookupError or the registry's
      errors (UnknownModel → 404, ModelUnavailable → 503; ModelLoading → 503 at submit, waited out when
      resuming).
    - `refine(sam_model, image_bytes, image, shapes)` turns detections into SAM masks for jobs with
      `sam_refine`; `check_refine(sam_model)` (raising like get_detector) validates that name at submit.
    - `ray` runs the images of `"engine": "ray"` jobs on Ray Data; without it such jobs are refused (422).
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
        embed: Embed | None = None,
        ray: RayJobs | None = None,
    ) -> None:
        self._get_detector = get_detector
        self._ray = ray
        self._embed = embed
        self._refine = refine
        self._check_refine = check_refine
        self._settings = settings or get_settings()
        self._prefetch = max(prefetch, 1)
        self._readers = max(readers, 1)
        self.store = JobStore(state_db)
        self._purge_old_jobs()
        self._lock = threading.Lock()
        self._active: dict[str, JobControl] = {}
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
        self._check_engine(spec)
        detector = self.detector(spec.detector, spec.vocabulary)
        info = detector.info
        check_spec(spec, info, self._refine is not None, self._check_refine)
        if spec.output.directory is not None:
            check_output(spec.output.directory, self._settings)
        check_destinations(spec, self.store)
        if spec.sample is not None and spec.sample.embeddings is not None:
            if self._embed is None:
                raise ApiError(
                    422,
                    "embed_unavailable",
                    "This server has no SAM embeddings for sample jobs; use the detector's own features "
                    '("embedding": "detector").',
                )
            if self._check_refine is not None:
                model_call(spec.sample.embeddings, self._check_refine)
        elif spec.sample is not None and not detector.pools_features:
            raise ApiError(
                422,
                "embed_unsupported",
                f"{spec.detector!r} gives no pooled features (only Ultralytics YOLO models do); use SAM "
                'embeddings ("embedding": "sam" with a SAM model in "embeddings").',
            )
        annotations = None
        if spec.review is not None:
            entries, annotations = review_entries(spec, info, self._settings)
        elif spec.uses_cvat():
            entries = cvat_checked_entries(spec, info, self._settings)
        else:
            entries = spec.source.enumerate(self._settings)
        if spec.output.format is not None:
            check_names(spec.output.format, (name for _, name in entries))
        if spec.sample is not None:
            check_budget(spec, len(entries))
            check_new_task(spec, entries, self._settings)

        job_id = uuid.uuid4().hex
        secrets = spec.secrets()
        # The spec's JSON has the credentials redacted; the real ones are kept apart until the job completes.
        stored = spec.model_dump_json()
        total = self.store.create_job(
            job_id, stored, entries, time.time(), json.dumps(secrets) if secrets else None, annotations
        )
        log.info("job %s: %d images, %s -> %s", job_id, total, spec.detector, ", ".join(destinations(spec)))
        self._enqueue(job_id)
        return self.status(job_id)

    def _check_engine(self, spec: JobSpec) -> None:
        if spec.engine != "ray":
            return
        if self._ray is None:
            raise ApiError(
                422,
                "engine_unavailable",
                "This process cannot run jobs on Ray: install the `ray` extra "
                "(pip install 'labelserve[ray]') and restart it, "
                'or submit the job with "engine": "local".',
            )
        if spec.review is not None or spec.sample is not None:
            raise ApiError(
                422,
                "engine_unsupported",
                'Review and sample jobs run on the local engine only: submit them with "engine": "local".',
            )

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

    def detector(self, name: str, vocabulary: dict[str, list[str]] | None = None) -> Detector:
        """The named detector, with lookup errors as ApiErrors (404 unknown, 503 unavailable or loading); a
        concept detector answers `vocabulary`'s labels when one is given (a job's)."""
        return job_detector(self._get_detector, name, vocabulary)

    def list(self, state: JobState | None = None, limit: int = 100) -> list[JobStatus]:
        rows = self.store.jobs([state] if state else None, limit=limit)
        return [self._status(row) for row in rows]

    def corrections(self, request: CorrectionsRequest) -> dict[str, Any]:
        """The corrections report of a pre-labelled CVAT task (server.jobs.corrections)."""
        return corrections_report(self.store, self._settings, request)

    # -- status ----------------------------------------------------------------------------------------------

    def _row(self, job_id: str) -> JobRow:
        row = self.store.job(job_id)
        if row is None:
            raise ApiError(404, "unknown_job", f"No job {job_id!r}; GET /v1/jobs lists the jobs.")
        return row

    def _status(self, row: JobRow) -> JobStatus:
        with self._lock:
            control = self._active.get(row.id)
            rate = control.rate() if control is not None else self._last_rate.get(row.id)
        return job_status(row, self.store, self._settings, rate)

    # -- running -------------------------------------------------------------------------------------------

    def _enqueue(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._active:
                return
            self._active[job_id] = JobControl()
        self._queue.put(job_id)

    def _work(self) -> None:
        while (job_id := self._queue.get()) is not None:
            with self._lock:
                control = self._active[job_id]
            try:
                self._run(job_id, control)
            except JobFailed as exc:
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

    def _run(self, job_id: str, control: JobControl) -> None:
        row = self.store.job(job_id)
        if row is None or row.state not in ACTIVE_STATES or control.stop.is_set():
            return
        if not self.store.transition(job_id, "running", only_from=ACTIVE_STATES, now=time.time()):
            return
        spec = JobSpec.model_validate_json(row.spec)
        secrets = self.store.secrets(job_id)
        if secrets is not None:
            spec = spec.with_secrets(json.loads(secrets))
        for task in (spec.source.cvat_task, spec.output.cvat_task, spec.issues(), spec.new_task()):
            if task is not None:  # credentials gone, or a profile removed: fail now, not after every image
                _cvat_step("logging in to CVAT", cvat.Login.of, task, self._settings)
        if spec.sam_refine is not None and self._refine is None:  # resumed by a process without SAM
            raise JobFailed("the job asks for SAM refinement, which this process does not have")
        if spec.review is not None and spec.review.sam is not None and self._refine is None:
            raise JobFailed("the review asks for SAM, which this process does not have")
        if spec.sample is not None and spec.sample.embeddings is not None and self._embed is None:
            raise JobFailed("the sample job needs SAM embeddings, which this process does not have")
        if spec.engine == "ray" and self._ray is None:  # resumed by a process without Ray
            raise JobFailed("the job runs on Ray, which this process does not have (the `ray` extra)")
        with contextlib.ExitStack() as stack:
            connections = stack.enter_context(cvat.Connections(self._settings)) if spec.uses_cvat() else None
            read: Read = self._read
            if connections is not None and spec.source.cvat_task is not None:
                read = _cvat_step("reading the CVAT task", connections.frame_reader, spec.source.cvat_task)
            detector = self._ready_detector(spec.detector, control, spec.vocabulary)
            if detector is not None and spec.source.video is not None:
                read_ahead = self._prefetch if self._readers > 0 else 0
                if spec.engine == "ray":
                    assert self._ray is not None
                    detector = self._ray.video_detector(spec, detector)
                process_video(self.store, job_id, spec, detector, control, self._settings, read_ahead)
            elif detector is not None:
                annotated = None
                if spec.review is not None and spec.review.sam is not None:
                    with cvat.Connections(self._settings) as own:
                        annotated = _review_step(
                            annotated_items, self.store, job_id, spec, connections or own, self._settings
                        )
                self._process(job_id, spec, detector, control, read, annotated)
            if control.stop.is_set():
                self._stopped(job_id, control)
                return
            left = self.store.pending(job_id, -1, 1)
            if left:
                raise JobFailed(f"image {left[0][0]} and maybe others were left unprocessed; resume the job")
            assert detector is not None
            outputs: list[str] = []
            if spec.sample is not None:
                page = write_sample(self.store, job_id, spec, self._settings)
                outputs += output_locations(spec) + ([page] if page is not None else [])
            elif spec.review is not None:
                with cvat.Connections(self._settings) as own:
                    write_review(
                        self.store, job_id, spec, detector.info, self._settings, read, connections or own
                    )
                outputs += output_locations(spec)
            elif spec.output.directory is not None:
                write_files(self.store, job_id, spec, detector.info, self._total(job_id), self._settings)
                outputs += output_locations(spec)
            if connections is not None and spec.output.cvat_task is not None:
                uploaded = upload_to_cvat(
                    self.store, job_id, spec, detector.info, connections, control, self._settings
                )
                if not uploaded:
                    self._stopped(job_id, control)
                    return
                outputs.append(task_page(spec.output.cvat_task, self._settings))
        if self.store.transition(job_id, "completed", only_from=("running",), now=time.time()):
            self.store.set_secrets(job_id, None)  # nothing left to do with them
            if spec.source.video is not None:
                self._video_done(job_id, spec.source.video)
            log.info("job %s completed: %s", job_id, ", ".join(outputs))

    def _stopped(self, job_id: str, control: JobControl) -> None:
        if control.reason == "shutdown":  # not the user's decision: leave it to be resumed
            self.store.transition(job_id, "queued", only_from=("running",))

    def _ready_detector(
        self, name: str, control: JobControl, vocabulary: dict[str, list[str]] | None = None
    ) -> Detector | None:
        """The detector, waiting while it loads (a server resuming jobs at start-up); None when stopped."""
        while not control.stop.is_set():
            try:
                return self.detector(name, vocabulary)
            except ApiError as exc:
                if exc.code != "model_loading":
                    raise JobFailed(exc.message) from None
            control.stop.wait(2.0)
        return None

    def _video_done(self, job_id: str, video: str) -> None:
        """A completed job is never resumed: drop its tracker state, and its copy of a remote video unless
        another unfinished job reads it."""
        self.store.drop_checkpoint(job_id)
        if local_path(video) is not None:
            return
        active = self.store.jobs(ACTIVE_STATES)
        if video not in (JobSpec.model_validate_json(row.spec).source.video for row in active):
            copy_path(video, self._settings).unlink(missing_ok=True)

    def _total(self, job_id: str) -> Callable[[], int]:
        """The job's item count, read when asked (a video format's metadata needs it)."""
        return lambda: self._row(job_id).total

    def _process(
        self,
        job_id: str,
        spec: JobSpec,
        detector: Detector,
        control: JobControl,
        read: Read,
        annotated: dict[int, AnnotatedImage] | None = None,
    ) -> None:
        run = ImageRun(
            self.store,
            job_id,
            spec,
            detector,
            control,
            read,
            self._refine,
            self._settings.max_image_pixels,
            self._readers,
            self._prefetch,
            annotated,
            self._embed,
        )
        if spec.engine == "ray":
            assert self._ray is not None
            self._ray.process_images(run)
        else:
            run.process()

    def _read(self, ref: str) -> bytes:
        return read(ref, self._settings)


def job_detector(
    get_detector: GetDetector, name: str, vocabulary: dict[str, list[str]] | None = None
) -> Detector:
    """The named detector, with lookup errors as ApiErrors (404 unknown, 503 unavailable or loading); a
    concept detector answers `vocabulary`'s labels when one is given (a job's). The Ray engine's actors look
    their detector up the same way."""
    detector = model_call(name, get_detector)
    if vocabulary is None:
        if isinstance(detector, ConceptDetector) and not detector.info.class_names:
            raise ApiError(
                422,
                "no_vocabulary",
                f"{name!r} finds concepts: give the job a 'vocabulary' {{label: [phrases]}}, or "
                "configure LABELSERVE_CONCEPT_VOCABULARY on the server.",
            )
        return detector
    if not isinstance(detector, ConceptDetector):
        raise ApiError(
            422,
            "vocabulary_unsupported",
            f"{name!r} has fixed classes; 'vocabulary' is for concept detectors (SAM 3).",
        )
    try:
        return detector.with_vocabulary(vocabulary)
    except ValueError as exc:
        raise ApiError(422, "bad_vocabulary", f"vocabulary: {exc}") from None


def _review_step(step: Callable[..., T], *args: object) -> T:
    """Reading a review's annotations while it runs: its ApiError fails the job with the message."""
    try:
        return step(*args)
    except ApiError as exc:
        raise JobFailed(f"reading the annotations failed: {exc.message}") from None


def _cvat_step(doing: str, step: Callable[..., T], *args: object) -> T:
    """A CVAT call while a job runs: its ApiError fails the job with the message."""
    try:
        return step(*args)
    except ApiError as exc:
        raise JobFailed(f"{doing} failed: {exc.message}") from None
