"""Batch jobs on Ray Data (`"engine": "ray"`): the images of a job run on an actor pool, the rest of the job
(validation, the SQLite ledger, the output files, the CVAT upload) runs in this process, the driver, exactly
as for a local job (server.jobs.engine.LocalEngine does it; this module only replaces the detection loop).

    pending items ─ aligned_batches ─► ray.data.from_items(one row per batch)
        .map_batches(_Predictor, batch_size=1, concurrency=ray_job_actors, num_gpus=…)   (actor pool)
        .iter_rows() ─► BatchRecorder: one ledger transaction per batch, on the driver

- **Same output.** A row is one of the local engine's batches (item indices grouped by index // batch_size),
  and each actor runs the local engine's own BatchWorker on it with the same models, so the stored results,
  and hence the files the local writers make from them, are byte-identical.
- **At-least-once in, exactly-once out.** Ray restarts a killed actor and retries its batch (the actor pool's
  defaults: max_restarts=-1, max_task_retries=-1); the ledger only moves pending items, so a batch recorded
  twice counts once. A killed driver loses the batches in flight; running the spec again resumes from the
  ledger, and aligned batches are the same batches as in an uninterrupted run.
- **The driver is the only writer** of the ledger, which is also where progress comes from.
- Each actor builds its models, its image reader and hence its B2-safe S3 clients
  (server.inputs.objectstore caches them per settings object) once, in its constructor.

A video job's frames are decoded and tracked in order on the driver; only their detection runs on a Ray actor
(_RemoteDetector), since a tracker needs every frame's detections in order.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import partial
from typing import Any

import numpy as np

from models.detector import Detector, DetectParams
from models.shapes import Shape
from server.cvat import tasks as cvat
from server.inputs.urls import read as read_url
from server.jobs.control import JobFailed
from server.jobs.engine import GetDetector, job_detector
from server.jobs.image_job import BatchRecorder, BatchWorker, ImageRun, Read, Refine, aligned_batches
from server.jobs.spec import JobSpec
from server.jobs.store import Outcome
from server.services.detect import job_runtime
from server.settings import Settings

log = logging.getLogger("labelserve.jobs")

# (settings, detector name, SAM model or None) -> (get_detector, refine): how an actor builds its models.
# It runs in the actor's process, so it must be importable there (a module-level function).
Models = Callable[[Settings, str, str | None], tuple[GetDetector, Refine | None]]


class _Worker:
    """What one actor holds: the job's models and reader, built once."""

    def __init__(self, spec_json: str, secrets: dict, settings: Settings, models: Models, readers: int):
        spec = JobSpec.model_validate_json(spec_json)
        spec = spec.with_secrets(secrets) if secrets else spec
        get_detector, refine = models(settings, spec.detector, spec.sam_refine)
        detector = job_detector(get_detector, spec.detector, spec.vocabulary)
        self._settings = settings  # the object store caches its S3 clients per settings object
        read: Read = partial(read_url, settings=settings)
        if spec.source.cvat_task is not None:
            self._connections = cvat.Connections(settings).__enter__()  # lives as long as the actor
            read = self._connections.frame_reader(spec.source.cvat_task)
        self.worker = BatchWorker(spec, detector, read, refine, settings.max_image_pixels)
        # As in the local engine: reader threads only on GPU hosts; on a CPU, inference fills every core.
        self._pool = ThreadPoolExecutor(readers, thread_name_prefix="ray-job-reader") if readers else None


class _Predictor(_Worker):
    """The actor-pool callable: each input row is one batch of (index, ref) as JSON; its output row the
    batch's outcomes (and the detector's error when it failed on every image), as JSON."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for refs_json in batch["refs"]:
            refs = [(int(index), str(ref)) for index, ref in json.loads(refs_json)]
            if self._pool is not None:
                loaded = list(self._pool.map(lambda r: self.worker.load(*r), refs))
            else:
                loaded = [self.worker.load(*r) for r in refs]
            outcomes, error = self.worker.infer(loaded)
            out.append(json.dumps({"outcomes": [asdict(o) for o in outcomes], "error": error}))
        return {"result": np.array(out, dtype=object)}


class _DetectorActor(_Worker):
    """A video job's detector on a Ray actor."""

    def detect(self, images: list[np.ndarray], params: DetectParams) -> list[list[Shape]]:
        return self.worker.detector.detect(images, params)


class _RemoteDetector(Detector):
    """A Detector whose detect() runs on a _DetectorActor (restarted and retried by Ray if it dies)."""

    def __init__(self, local: Detector, actor: Any) -> None:
        self.info = local.info
        self._actor = actor

    def detect(self, images: Sequence[np.ndarray], params: DetectParams) -> list[list[Shape]]:
        import ray

        return ray.get(self._actor.detect.remote(list(images), params))


class RayBatchEngine:
    """Runs the images of `"engine": "ray"` jobs on Ray Data (server.jobs.engine.RayJobs).

    It joins `ray_address` (or starts a local Ray instance) at the first Ray job, unless this process is
    already connected (a RayJob's entrypoint, or tests). `models` builds the job's models inside each actor.
    """

    def __init__(self, settings: Settings, models: Models = job_runtime) -> None:
        self._settings = settings
        self._models = models
        self._lock = threading.Lock()

    def _connect(self) -> None:
        # Ray is imported at the first Ray job, not with this module: the server starts without paying for it.
        import ray
        import ray.data

        with self._lock:
            if ray.is_initialized():
                return
            joined = self._settings.ray_address is not None
            ray.init(address=self._settings.ray_address, include_dashboard=False if not joined else None)
            ray.data.DataContext.get_current().enable_progress_bars = False  # progress is the ledger's

    def _resources(self) -> dict[str, float]:
        import ray

        gpus = self._settings.ray_job_num_gpus
        if gpus is None:  # Ray hides the GPUs from an actor that reserved none
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        return {"num_cpus": self._settings.ray_job_num_cpus, "num_gpus": gpus}

    def _worker_args(self, spec: JobSpec, readers: int) -> dict[str, Any]:
        # The spec's JSON has its credentials redacted: they travel apart, as in the job store.
        return {
            "spec_json": spec.model_dump_json(),
            "secrets": spec.secrets(),
            "settings": self._settings,
            "models": self._models,
            "readers": readers,
        }

    def process_images(self, run: ImageRun) -> None:
        import ray.data
        import ray.exceptions

        self._connect()
        control = run.control
        control.started = time.monotonic()
        batches = [json.dumps(batch) for batch in aligned_batches(run.pending(), run.spec.batch_size)]
        if not batches:
            return
        resources = self._resources()
        readers = run.readers if resources["num_gpus"] > 0 else 0
        # One block per batch: each result comes back (and is committed) as soon as its batch is done.
        results = ray.data.from_items(
            [{"refs": batch} for batch in batches], override_num_blocks=len(batches)
        ).map_batches(
            _Predictor,
            batch_size=1,
            batch_format="numpy",
            concurrency=min(self._settings.ray_job_actors, len(batches)),
            fn_constructor_kwargs=self._worker_args(run.spec, readers),
            **resources,
        )
        log.info("job %s: %d batches on Ray Data (%s per actor)", run.job_id, len(batches), resources)
        recorder = BatchRecorder(run.store, run.job_id, control)
        try:
            for row in results.iter_rows():
                found = json.loads(row["result"])
                recorder.add([Outcome(**o) for o in found["outcomes"]], found["error"])
                if control.stop.is_set():
                    return  # leaving the iterator shuts the dataset's execution down
        except (
            ray.exceptions.RayError
        ) as exc:  # e.g. an actor that cannot load the model: pending stays pending
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise JobFailed(f"the Ray job failed: {first}") from exc
        recorder.finish()

    def video_detector(self, spec: JobSpec, local: Detector) -> Detector:
        import ray

        self._connect()
        actor_class = ray.remote(max_restarts=-1, max_task_retries=-1, **self._resources())(_DetectorActor)
        return _RemoteDetector(local, actor_class.remote(**self._worker_args(spec, 0)))


def ray_available() -> bool:
    """Whether the `ray` extra is installed, without importing it."""
    return importlib.util.find_spec("ray") is not None
