"""How a job's images run: reader threads read and decode ahead of inference through a bounded queue (or the
inference thread reads them itself), the detector runs on batches of `batch_size` in item order, SAM
refines the boxes when asked, and each batch's results are committed in one transaction. So a crash loses at
most the batches in flight, and resuming processes only what is still pending.

BatchWorker (one batch's reading and inference) and BatchRecorder (committing batches) are shared with the Ray
engine (server.scale.batch), whose actors run BatchWorker on the same batches (aligned_batches).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from models.detector import Detector, DetectParams, run_detection
from models.shapes import Shape
from server.errors import ApiError
from server.formats.annotations import AnnotatedImage
from server.formats.ranking import embedding_shape
from server.formats.stored import shape_to_dict
from server.inputs.images import decode_image
from server.jobs.control import JobControl, JobFailed
from server.jobs.handoff import Handoff, lower_priority
from server.jobs.spec import JobSpec
from server.jobs.store import JobStore, Outcome

log = logging.getLogger("labelserve.jobs")

Read = Callable[[str], bytes]  # an item's ref → its bytes
# (SAM model name, image bytes, decoded RGB image, detections) -> refined shapes
Refine = Callable[[str, bytes, np.ndarray, list[Shape]], list[Shape]]
# (SAM model name, image bytes, decoded RGB image) -> the image's embedding vector (sample jobs)
Embed = Callable[[str, bytes, np.ndarray], np.ndarray]

FAILED_BATCHES_LIMIT = 3  # batches in a row on which the detector fails every image: the job fails


@dataclass
class _Loaded:
    index: int
    image: np.ndarray | None = None
    data: bytes | None = None  # kept only when SAM refinement needs the bytes
    error: str | None = None


@dataclass(frozen=True)
class BatchWorker:
    """What turns a batch of item references into outcomes: reading, decoding, detecting, SAM refinement.
    The local engine runs one in its inference thread; the Ray engine one in each actor, so both produce
    the same results for the same batch."""

    spec: JobSpec
    detector: Detector
    read: Read
    refine: Refine | None
    max_pixels: int
    # Review jobs with a SAM model: each item's annotations, whose polygons and masks SAM segments from
    # their boxes; the masks are stored with the detections, marked with the annotation they answer.
    annotated: dict[int, AnnotatedImage] | None = None
    embed: Embed | None = None  # sample jobs: each image's vector is stored with its detections

    @property
    def sam(self) -> str | None:
        return self.spec.sam_refine if self.spec.review is None else self.spec.review.sam

    def load(self, index: int, ref: str) -> _Loaded:
        """Read and decode one image; any problem becomes the item's failure reason, never an exception."""
        keep_bytes = self.sam is not None or self.spec.sample is not None
        try:
            data = self.read(ref)
            image = decode_image(data, self.max_pixels)
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

    def infer(self, batch: list[_Loaded]) -> tuple[list[Outcome], str | None]:
        """Outcomes of one batch, and the detector's error when it failed on every image of the batch."""
        detector, spec, params = self.detector, self.spec, self.spec.params.detect_params()
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
            stage = ""
            try:
                for name, step in self._after_detection(spec, item):
                    stage = name  # for the failure message
                    shapes = step(shapes)
            except ApiError as exc:
                outcomes.append(Outcome(item.index, error=f"{stage} failed: {exc.message}"))
                continue
            except Exception as exc:  # a model's own bug: the image fails, the job goes on
                log.exception("%s failed on item %d", stage, item.index)
                outcomes.append(Outcome(item.index, error=f"{stage} failed: {exc}"))
                continue
            result = json.dumps([shape_to_dict(s) for s in shapes], separators=(",", ":"))
            outcomes.append(Outcome(item.index, width, height, result))
        return outcomes, None

    def _after_detection(
        self, spec: JobSpec, item: _Loaded
    ) -> list[tuple[str, Callable[[list[Shape]], list[Shape]]]]:
        """What runs on one image's detections, in order, each named for its failure message: SAM refinement,
        a review's SAM masks of the annotated shapes, a sample job's image embedding."""
        steps: list[tuple[str, Callable[[list[Shape]], list[Shape]]]] = []
        data, image = item.data, item.image
        if spec.sam_refine is not None:
            refine, model = self.refine, spec.sam_refine
            assert refine is not None and data is not None and image is not None
            steps.append(("SAM refinement", lambda shapes: refine(model, data, image, shapes)))
        if self.annotated is not None and item.index in self.annotated:
            prompt, sam, annotated = self.refine, self.sam, self.annotated[item.index]
            assert prompt is not None and sam is not None and data is not None
            steps.append(("SAM", lambda shapes: shapes + review_masks(prompt, sam, item, annotated)))
        if spec.sample is not None and spec.sample.embeddings is not None:
            embed, embeddings = self.embed, spec.sample.embeddings
            assert embed is not None and data is not None
            steps.append(
                ("embedding", lambda shapes: [*shapes, embedding_shape(embed(embeddings, data, image))])
            )
        elif spec.sample is not None:  # the detector's own pooled features
            detector, imgsz = self.detector, spec.params.imgsz
            assert image is not None
            steps.append(
                (
                    "embedding",
                    lambda shapes: [*shapes, embedding_shape(detector.pooled_features([image], imgsz)[0])],
                )
            )
        return steps


@dataclass
class BatchRecorder:
    """Commits batches' outcomes to the store, one transaction each, and counts them for the job's rate.
    A batch on which the detector failed every image is held back (maybe a broken detector rather than bad
    images): it is committed with the next good batch, and after several in a row the job fails with its
    items still pending, to be retried on resume."""

    store: JobStore
    job_id: str
    control: JobControl
    held: list[Outcome] = field(default_factory=list)
    failed_batches: int = 0

    def add(self, outcomes: list[Outcome], detector_error: str | None) -> None:
        """JobFailed after FAILED_BATCHES_LIMIT failed batches in a row; halts the job once cancelled."""
        if detector_error is not None:
            self.held += outcomes
            self.failed_batches += 1
            if self.failed_batches >= FAILED_BATCHES_LIMIT:
                raise JobFailed(
                    f"the detector failed on {self.failed_batches} batches in a row: {detector_error}"
                )
            return
        self.store.record(self.job_id, self.held + outcomes)
        self.control.processed += len(self.held) + len(outcomes)
        self.held, self.failed_batches = [], 0
        job = self.store.job(self.job_id)
        if job is None or job.state != "running":  # cancelled, maybe by another process
            self.control.halt("cancel")

    def finish(self) -> None:
        if self.held:
            self.store.record(self.job_id, self.held)
            self.control.processed += len(self.held)
            self.held = []


def aligned_batches(refs: Iterable[tuple[int, str]], size: int) -> Iterator[list[tuple[int, str]]]:
    """Pending (index, ref) in item order, grouped by index // size: the batches of a straight run, whatever
    was done before, since every engine commits whole batches (detector numerics depend on a batch's
    composition, so the same items must share a batch for resumed output to be byte-identical)."""
    batch: list[tuple[int, str]] = []
    for ref in refs:
        if batch and batch[0][0] // size != ref[0] // size:
            yield batch
            batch = []
        batch.append(ref)
    if batch:
        yield batch


@dataclass(frozen=True)
class ImageRun:
    """One run of an image job's pending items, and what it runs them with."""

    store: JobStore
    job_id: str
    spec: JobSpec
    detector: Detector
    control: JobControl
    read: Read
    refine: Refine | None
    max_pixels: int
    readers: int  # reader/decoder threads; 0 reads in the inference thread
    prefetch: int  # decoded images kept ahead of inference
    annotated: dict[int, AnnotatedImage] | None = None  # see BatchWorker
    embed: Embed | None = None

    def worker(self) -> BatchWorker:
        return BatchWorker(
            self.spec, self.detector, self.read, self.refine, self.max_pixels, self.annotated, self.embed
        )

    def process(self) -> None:
        """Process the job's pending items; returns when none is left, or when stopped. JobFailed when the
        detector fails on every image of several batches in a row."""
        worker, control = self.worker(), self.control
        control.started = time.monotonic()
        recorder = BatchRecorder(self.store, self.job_id, control)
        reader = (
            _Prefetch(self.pending(), worker.load, self.readers, self.prefetch, control.stop)
            if self.readers > 0
            else _Inline(self.pending(), worker.load, control.stop)
        )
        with reader as prefetch:
            for batch in prefetch.batches(self.spec.batch_size):
                recorder.add(*worker.infer(batch))
                if control.stop.is_set():
                    return
        recorder.finish()

    def pending(self, page: int = 512) -> Iterator[tuple[int, str]]:
        """The job's pending (index, ref), in item order, page by page."""
        after = -1
        while rows := self.store.pending(self.job_id, after, page):
            yield from rows
            after = rows[-1][0]


REVIEW_OF = "labelserve_review_of"  # attribute of a stored SAM mask: the annotation id it answers


def review_masks(refine: Refine, sam: str, item: _Loaded, annotated: AnnotatedImage) -> list[Shape]:
    """SAM's mask for each polygon or mask annotation, prompted with the annotation's box."""
    assert item.image is not None and item.data is not None
    height, width = item.image.shape[:2]
    prompts = [
        a
        for a in annotated.in_pixels(width, height)
        if a.shape.kind in ("polygon", "mask") and a.shape.bounds() is not None
    ]
    boxes = [Shape("box", label=a.shape.label, box=a.shape.bounds()) for a in prompts]
    if not boxes:
        return []
    masks = refine(sam, item.data, item.image, boxes)
    return [
        replace(mask, attributes={REVIEW_OF: a.shape_id})
        for a, mask in zip(prompts, masks, strict=True)
        if mask.kind == "mask"
    ]


def _detect(detector: Detector, images: list[np.ndarray | None], params: DetectParams) -> list[list[Shape]]:
    found = run_detection(detector, images, params)  # type: ignore[arg-type]
    if len(found) != len(images):
        raise RuntimeError(f"the detector returned {len(found)} results for {len(images)} images")
    return found


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
