"""SAM requests end to end: image bytes or id → cached embedding → prompts → masks in the asked formats."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.base import ImageEmbedding, ImageEncoder, Prompt
from models.registry import EncoderKind, ModelRegistry
from models.shapes import RegionMask
from server.errors import ApiError, shutting_down
from server.formats.api_json import render_mask
from server.formats.rle import coco_rle_decode, cvat_rle_decode
from server.inputs.images import image_id
from server.ops.timing import Timings
from server.schemas import MaskPrompt, SegmentRequest
from server.services.embeddings import Tier, TieredEmbeddings
from server.services.embeddings.l2 import build_l2
from server.services.embeddings.refine import PromptKey, RefinementHistory
from server.services.embeddings.scheduler import Priority
from server.settings import Settings


@dataclass(frozen=True)
class Embedded:
    image_id: str
    embedding: ImageEmbedding
    tier: Tier  # where the embedding came from: l1, l2, or a fresh encode

    @property
    def cached(self) -> bool:
        return self.tier != "encode"


@dataclass(frozen=True)
class Prediction:
    embedded: Embedded
    masks: list[tuple[RegionMask, float]]  # best first
    refined_from: int | None  # size of the earlier prompt set whose logits were reused


class SamService:
    def __init__(self, registry: ModelRegistry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings
        self.embeddings = TieredEmbeddings(settings, build_l2(settings))
        self.cache = self.embeddings.l1  # the in-process L1
        self.history = RefinementHistory(settings.prompt_history_bytes)

    def embed(
        self,
        model: str,
        data: bytes,
        timings: Timings,
        priority: Priority = Priority.INTERACTIVE,
        decoded: np.ndarray | None = None,
        kind: EncoderKind | None = "segmenter",
    ) -> Embedded:
        """`decoded`: `data` already decoded by the caller (jobs), so a miss does not decode it again. `kind`:
        whose features, the click head's or the concept head's; None: the model's widest encoder (prefetch:
        SAM 3's concept encode fills its clicks' entry too)."""
        segmenter = self.registry.encoder(model, kind)
        with timings.stage("hash"):
            content_id = image_id(data)
        found = self.embeddings.get_or_encode(segmenter, content_id, data, timings, priority, decoded)
        return Embedded(content_id, found.embedding, found.tier)

    def embed_decoded(
        self, model: str, content_id: str, image: np.ndarray, kind: EncoderKind | None = "segmenter"
    ) -> ImageEmbedding:
        """The embedding of an already decoded image (video frames), through the same tiers as `embed`."""
        segmenter = self.registry.encoder(model, kind)
        found = self.embeddings.get_or_encode(
            segmenter, content_id, b"", Timings(), Priority.INTERACTIVE, decoded=image
        )
        return found.embedding

    def cached_embedding(
        self,
        model: str,
        content_id: str,
        timings: Timings | None = None,
        kind: EncoderKind | None = "segmenter",
    ) -> Embedded:
        segmenter = self.registry.encoder(model, kind)
        found = self.embeddings.find(segmenter, content_id, timings or Timings())
        if found is None:
            raise ApiError(
                404,
                "image_not_cached",
                f"No embedding of image {content_id} for model {model!r} (never sent, or evicted from the "
                "cache); send the image itself in 'image', or POST it to /v1/sam/{model}/embed first.",
            )
        return Embedded(content_id, found.embedding, found.tier)

    def is_cached(self, model: str, content_id: str, kind: EncoderKind | None = "segmenter") -> bool:
        """Whether L1 or L2 holds the image's embedding (an L2 hit fills L1); not counted as a request."""
        segmenter = self.registry.encoder(model, kind)
        return self.embeddings.find(segmenter, content_id, Timings(), count=False) is not None

    def predict(
        self, model: str, data: bytes | None, request: SegmentRequest, timings: Timings
    ) -> Prediction:
        if request.boxes is not None:  # refused before an encode, where it can be
            check_boxes_request(request, self.settings.sam_max_boxes)
        if data is not None:
            embedded = self.embed(model, data, timings)
        else:
            assert request.image_id is not None
            embedded = self.cached_embedding(model, request.image_id, timings)
        return self.predict_on(model, embedded, request, timings)

    def predict_on(
        self, model: str, embedded: Embedded, request: SegmentRequest, timings: Timings
    ) -> Prediction:
        """Decode prompts against an embedding the caller holds (it cannot be evicted meanwhile)."""
        segmenter = self.registry.segmenter(model)
        embedding = embedded.embedding
        height, width = embedding.original_size
        if request.boxes is not None:
            boxes = build_boxes(request, width, height, self.settings.sam_max_boxes)
            masks = self.segment_boxes(model, embedded, boxes, bool(request.multimask_output), timings)
            return Prediction(embedded, masks, None)
        prompt = build_prompt(request, width, height)
        if request.mask_input is not None:
            with timings.stage("mask_prompt"):
                mask = _decode_mask_prompt(request.mask_input, width, height)
                prompt = Prompt(
                    prompt.points, prompt.labels, prompt.box, segmenter.low_res_from_mask(embedding, mask)
                )

        key = PromptKey.of(prompt.points, prompt.labels, prompt.box)
        refined_from = None
        if request.refine and prompt.mask_input is None:
            base = self.history.base_for(model, embedded.image_id, key)
            if base is not None:
                prompt = Prompt(prompt.points, prompt.labels, prompt.box, base[0])
                refined_from = base[1]
        multimask = request.multimask_output
        if multimask is None:
            multimask = len(prompt.points) == 1 and prompt.box is None and prompt.mask_input is None

        with timings.stage("decode_mask"):
            decoded = segmenter.decode(embedding, prompt, multimask)
        order = np.argsort(-decoded.scores, kind="stable")
        best = segmenter.as_mask_prompt(decoded.low_res_logits[order[0]][None])
        self.history.record(model, embedded.image_id, key, best)
        masks = []
        for index in order[: request.max_masks]:
            with timings.stage("upsample"):
                masks.append(
                    (
                        segmenter.upsample(embedding, decoded.low_res_logits[index]),
                        float(decoded.scores[index]),
                    )
                )
        return Prediction(embedded, masks, refined_from)

    def segment_boxes(
        self, model: str, embedded: Embedded, boxes: np.ndarray, multimask: bool, timings: Timings
    ) -> list[tuple[RegionMask, float]]:
        """One mask per box ([B, 4], valid and inside the image: build_boxes, check_box), the boxes decoded in
        batches against the one embedding (the detector → SAM path); each box's best mask when `multimask`.
        Not recorded for refinement: a later click extends a prompt set of its own."""
        segmenter = self.registry.segmenter(model)
        embedding = embedded.embedding
        with timings.stage("decode_mask"):
            decoded = segmenter.decode_boxes(embedding, boxes, multimask)
        masks = []
        for one in decoded:
            best = int(np.argsort(-one.scores, kind="stable")[0])
            with timings.stage("upsample"):
                mask = segmenter.upsample(embedding, one.low_res_logits[best])
            masks.append((mask, float(one.scores[best])))
        return masks

    def segment(self, model: str, data: bytes | None, request: SegmentRequest, timings: Timings) -> dict:
        prediction = self.predict(model, data, request, timings)
        tolerance = (
            self.settings.polygon_tolerance
            if request.polygon_tolerance is None
            else request.polygon_tolerance
        )
        with timings.stage("serialize"):
            masks = [
                {"score": round(score, 6), **render_mask(region, request.formats, tolerance)}
                for region, score in prediction.masks
            ]
        height, width = prediction.embedded.embedding.original_size
        return {
            "image_id": prediction.embedded.image_id,
            "model": model,
            "width": width,
            "height": height,
            "cached": prediction.embedded.cached,
            "cache_tier": prediction.embedded.tier,
            "refined_from_points": prediction.refined_from,
            "masks": masks,
        }

    def clear(self, l2_too: bool = False) -> dict:
        """This process's embeddings and refinement logits; the shared L2 only when asked."""
        return {**self.embeddings.clear(l2_too), "refinement": self.history.clear()}

    def forget(self, segmenter: ImageEncoder) -> dict:
        """What this service holds for an unloaded segmenter or concept model: its encoder, L1 entries and
        click logits."""
        return {
            "embeddings": self.embeddings.forget(segmenter),
            "refinement": self.history.forget(segmenter.name),
        }

    def stats(self) -> dict:
        return {**self.embeddings.stats(), "refinement": self.history.snapshot()}

    def drain(self) -> int:
        """SIGTERM: clicks on cached embeddings go on, encodes not yet started are answered 503 at once."""
        return self.embeddings.drain(shutting_down)

    def close(self) -> None:
        self.embeddings.close()


def _finite(values: list[float], what: str) -> None:
    if not all(math.isfinite(v) for v in values):
        raise ApiError(422, "bad_prompt", f"{what} contains NaN or infinite coordinates.")


def build_prompt(request: SegmentRequest, width: int, height: int) -> Prompt:
    """Validate prompts against the image (pixel-edge coordinates, 0..W × 0..H)."""
    # Checked in float64, as sent: 1e308 would overflow float32, the precision SAM works in, into inf.
    points = np.asarray(request.points, dtype=np.float64).reshape(-1, 2)
    _finite(points.ravel().tolist(), "points")
    labels = request.labels if request.labels is not None else [1] * len(points)
    if len(labels) != len(points):
        raise ApiError(
            422, "bad_prompt", f"{len(points)} points but {len(labels)} labels; give one label per point."
        )
    if any(label not in (0, 1) for label in labels):
        raise ApiError(422, "bad_prompt", "labels must be 1 (positive) or 0 (negative).")
    outside = [(float(x), float(y)) for x, y in points if not (0 <= x <= width and 0 <= y <= height)]
    if outside:
        raise ApiError(
            422,
            "prompt_outside_image",
            f"points {outside[:3]} lie outside the {width}x{height} image; "
            f"clicks must be within 0..{width} × 0..{height}.",
        )
    box = None if request.box is None else check_box(request.box, width, height)
    if not len(points) and box is None and request.mask_input is None:
        raise ApiError(422, "no_prompt", "No prompt: give at least one point, a box or a mask_input.")
    return Prompt(points.astype(np.float32), np.asarray(labels, dtype=np.int32), box)


def check_box(values: Sequence[float], width: int, height: int, what: str = "box") -> np.ndarray:
    """A box [x1, y1, x2, y2] as float32, clipped into the image as CVAT clips shapes; 422 when it is not
    finite, empty or reversed, or wholly outside the image."""
    _finite(list(values), what)
    x1, y1, x2, y2 = values
    if x2 <= x1 or y2 <= y1:
        raise ApiError(
            422,
            "bad_prompt",
            f"{what} {list(values)} is empty or reversed; send [x1, y1, x2, y2] with x1 < x2 and y1 < y2.",
        )
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        raise ApiError(
            422, "prompt_outside_image", f"{what} {list(values)} lies outside the {width}x{height} image."
        )
    box = np.array([max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)], dtype=np.float32)
    if box[2] <= box[0] or box[3] <= box[1]:  # [0, 0, 10, 1e-50] is empty once in float32
        raise ApiError(422, "bad_prompt", f"{what} {list(values)} is empty at float32 precision; widen it.")
    return box


def check_boxes_request(request: SegmentRequest, max_boxes: int) -> None:
    """What can be said of `boxes` before the image is embedded: alone, one mask each, not empty, capped."""
    assert request.boxes is not None
    if len(request.points) or request.box is not None or request.mask_input is not None:
        raise ApiError(
            422,
            "bad_prompt",
            "'boxes' is a batch of box-only prompts, one mask per box; send points, 'box' or mask_input in "
            "a request without 'boxes'.",
        )
    if request.max_masks != 1:
        raise ApiError(422, "bad_prompt", "With 'boxes' the reply has one mask per box: max_masks must be 1.")
    if not request.boxes:
        raise ApiError(422, "no_prompt", "'boxes' is empty; give at least one [x1, y1, x2, y2], or omit it.")
    if len(request.boxes) > max_boxes:
        raise ApiError(
            422,
            "too_many_boxes",
            f"{len(request.boxes)} boxes in one request; at most {max_boxes} (LABELSERVE_SAM_MAX_BOXES): "
            "split them over several requests with the same image_id.",
        )


def build_boxes(request: SegmentRequest, width: int, height: int, max_boxes: int) -> np.ndarray:
    """`boxes` as [B, 4] float32, each checked and clipped as `box` is."""
    check_boxes_request(request, max_boxes)
    assert request.boxes is not None
    return np.stack([check_box(box, width, height, f"boxes[{i}]") for i, box in enumerate(request.boxes)])


def _decode_mask_prompt(prompt: MaskPrompt, width: int, height: int) -> RegionMask:
    try:
        if prompt.cvat is not None:
            return cvat_rle_decode(prompt.cvat, width, height)
        mask = coco_rle_decode(prompt.coco_rle or {})
    except ValueError as exc:
        raise ApiError(422, "bad_mask_input", f"mask_input is not a valid mask: {exc}") from None
    if (mask.image_width, mask.image_height) != (width, height):
        raise ApiError(
            422,
            "bad_mask_input",
            f"mask_input is {mask.image_width}x{mask.image_height} but the image is {width}x{height}.",
        )
    return mask
