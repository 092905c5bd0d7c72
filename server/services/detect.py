"""Detection requests: image bytes → micro-batched detector → shapes, optionally refined into SAM masks."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from models.base import ImageEmbedding, unloaded
from models.concept_detector import ConceptDetector
from models.detector import Detector, DetectParams, run_detection, tiling_problem
from models.registry import ModelRegistry
from models.shapes import Shape
from models.tiling import TooManyTiles, check_tile_count
from server.errors import ApiError
from server.inputs.images import decode_image, pixel_id
from server.ops.timing import Timings
from server.services.batching import MicroBatcher
from server.services.embeddings.scheduler import Priority
from server.services.sam import SamService, check_box
from server.settings import Settings


@dataclass(frozen=True)
class Detections:
    detector: Detector
    width: int
    height: int
    shapes: list[Shape]


class DetectService:
    def __init__(self, registry: ModelRegistry, settings: Settings, sam: SamService) -> None:
        self.registry = registry
        self.settings = settings
        self.sam = sam
        self._batchers: dict[str, MicroBatcher[np.ndarray, list[Shape]]] = {}
        self._lock = threading.Lock()

    def batcher(self, model: str) -> MicroBatcher[np.ndarray, list[Shape]]:
        with self._lock:
            if model not in self._batchers:
                detector = self.registry.detector(model)
                if isinstance(detector, ConceptDetector):  # its vision features through the server's tiers
                    detector = detector.with_embed(lambda image: self._embed_pixels(model, image))
                self._batchers[model] = MicroBatcher(
                    lambda params, images: run_detection(detector, images, params),  # type: ignore[arg-type]
                    self.settings.detect_max_batch,
                    self.settings.detect_max_wait_ms,
                    model,
                    max_queue=self.settings.detect_queue_max,
                    timeout_s=self.settings.request_timeout_s,
                    retry_after_s=self.settings.busy_retry_after_s,
                )
            return self._batchers[model]

    def _embed_pixels(self, model: str, image: np.ndarray) -> ImageEmbedding:
        """A decoded image's features through the cache, keyed by its pixels (a detector sees no bytes)."""
        return self.sam.embed_decoded(model, "pixels-" + pixel_id(image), image, kind="concept")

    def forget(self, model: str) -> None:
        """After `model` was unloaded: its batcher runs what it holds, then stops; a reload gets a new one."""
        with self._lock:
            batcher = self._batchers.pop(model, None)
        if batcher is not None:
            batcher.retire(unloaded(model))

    def batchers(self) -> dict[str, MicroBatcher[np.ndarray, list[Shape]]]:
        """The micro-batchers started so far, by detector."""
        with self._lock:
            return dict(self._batchers)

    def detect(
        self, model: str, data: bytes, params: DetectParams, sam_refine: str | None, timings: Timings
    ) -> Detections:
        detector = self.registry.detector(model)
        if isinstance(detector, ConceptDetector) and not detector.info.class_names:
            raise ApiError(
                422,
                "no_vocabulary",
                f"{model!r} finds concepts and the server has no vocabulary (LABELSERVE_CONCEPT_VOCABULARY); "
                f"ask POST /v1/concepts/{model} with your phrases instead.",
            )
        if sam_refine is not None:
            self.registry.segmenter(sam_refine)  # fail before the work, not after it
        self._check_classes(detector, params)
        if problem := tiling_problem(detector.info, params):
            raise ApiError(422, "unsupported_tiling", problem)
        with timings.stage("decode_image"):
            image = decode_image(data, self.settings.max_image_pixels)
        if params.tile is not None:
            try:
                check_tile_count(image.shape[1], image.shape[0], params.tile, params.tile_overlap)
            except TooManyTiles as exc:
                raise ApiError(422, "too_many_tiles", str(exc)) from None
        with timings.stage("detect"):
            shapes = self.batcher(model).submit(params, image)
        if sam_refine is not None:
            with timings.stage("sam_refine"):
                shapes = self.refine(sam_refine, data, shapes, timings)
        height, width = image.shape[:2]
        return Detections(detector, width, height, shapes)

    def refine(
        self,
        model: str,
        data: bytes,
        shapes: list[Shape],
        timings: Timings,
        priority: Priority = Priority.INTERACTIVE,
        decoded: np.ndarray | None = None,
    ) -> list[Shape]:
        """Box → mask with SAM (the "detector + SAM" recipe): the image is hashed and embedded once, through
        the cache, and its boxes are decoded in batches against that embedding. A box SAM cannot take (empty
        or outside the image once clipped), or whose mask is empty, stays a box."""
        if not any(shape.kind == "box" for shape in shapes):
            return shapes
        embedded = self.sam.embed(model, data, timings, priority, decoded)
        height, width = embedded.embedding.original_size
        boxes: dict[int, np.ndarray] = {}
        for index, shape in enumerate(shapes):
            if shape.kind == "box" and shape.box is not None:
                try:
                    boxes[index] = check_box(shape.box, width, height)
                except ApiError:
                    continue
        if not boxes:
            return shapes
        masks = self.sam.segment_boxes(model, embedded, np.stack(list(boxes.values())), False, timings)
        refined = list(shapes)
        for index, (mask, _) in zip(boxes, masks, strict=True):
            if not mask.is_empty:
                refined[index] = replace(shapes[index], kind="mask", box=None, mask=mask)
        return refined

    def refine_for_job(self, model: str, data: bytes, image: np.ndarray, shapes: list[Shape]) -> list[Shape]:
        """`refine` for the job engine: its encodes queue behind annotators' clicks (background priority),
        and the image it decoded already is used as is."""
        return self.refine(model, data, shapes, Timings(), Priority.BACKGROUND, image)

    def pooled_embedding_for_job(self, model: str, data: bytes, image: np.ndarray) -> np.ndarray:
        """A sample job's image vector: the SAM model's cached image embedding (encoded at background
        priority on a miss), its first feature map averaged over space into one float32 per channel."""
        embedded = self.sam.embed(model, data, Timings(), Priority.BACKGROUND, image)
        features = next(iter(embedded.embedding.tensors.values()))
        return features.float().mean(dim=(0, 2, 3)).cpu().numpy().astype(np.float32)

    @staticmethod
    def _check_classes(detector: Detector, params: DetectParams) -> None:
        unknown = sorted(set(params.classes or ()) - set(detector.info.class_names))
        if unknown:
            raise ApiError(
                422, "unknown_class",
                f"classes {unknown} are not classes of {detector.info.name!r}; it has "
                f"{len(detector.info.class_names)} classes (GET /v1/models lists them).",
            )  # fmt: skip


def load_job_models(
    settings: Settings, detector: str, sam: str | None
) -> tuple[ModelRegistry, DetectService | None]:
    """A registry holding only a job's models, loaded now: the detector (a manifest name, or a local
    checkpoint path, .pt or .yaml, as in LABELSERVE_DETECTOR_PATHS) and the SAM model of its refinement if
    any; with the DetectService that refines when there is one. For `labelserve prelabel` and the Ray
    engine's actors."""
    models = [sam] if sam else []
    paths = dict(settings.detector_paths)
    if Path(detector).suffix in (".pt", ".yaml", ".yml"):
        paths[detector] = Path(detector)
    else:
        models.append(detector)
    settings = settings.model_copy(update={"models": models, "detector_paths": paths})
    registry = ModelRegistry(settings)
    registry.load_enabled()
    registry.detector(detector)  # raises with the fix when the weights are missing
    return registry, DetectService(registry, settings, SamService(registry, settings)) if sam else None


def job_runtime(
    settings: Settings, detector: str, sam: str | None
) -> tuple[Callable[[str], Detector], Callable[..., list[Shape]] | None]:
    """load_job_models as a job engine takes them: the detector lookup, and SAM refinement when `sam` is
    given. For `labelserve prelabel` and each actor of a Ray job, which must import it by name."""
    registry, detect = load_job_models(settings, detector, sam)
    return registry.detector, detect.refine_for_job if detect is not None else None
