"""Concept requests end to end: image bytes or id → cached vision features → phrases (and exemplar boxes) →
every instance, with masks in the asked formats.

The vision features go through the same tiers as SAM's embeddings (SamService's TieredEmbeddings: content
hash, L1, L2, prefetch, pixel aliases), under the concept model's own architecture tag; a phrase's text
features are kept by the model (models/sam3.py), so a second phrase on a cached image costs only the head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from models.concept import MAX_EXEMPLARS, MAX_PHRASE_CHARS, MAX_PHRASES, ConceptParams, Exemplars, Instance
from models.registry import ModelRegistry
from server.errors import ApiError
from server.formats.api_json import render_mask
from server.ops.timing import Timings
from server.schemas import ConceptExample, ConceptRequest, SegmentRequest
from server.services.sam import Embedded, SamService
from server.settings import Settings

VISUAL = "visual"  # the phrase of a query by exemplars alone (Sam3Processor's)


class ConceptService:
    def __init__(self, registry: ModelRegistry, sam: SamService, settings: Settings) -> None:
        self.registry = registry
        self.sam = sam  # its embedding tiers hold the concept models' vision features too
        self.settings = settings

    def find(self, model: str, data: bytes | None, request: ConceptRequest, timings: Timings) -> dict:
        concepts = self.registry.concept(model)
        if request.example is not None and "segmenter" not in self.registry.record(model).kinds:
            raise ApiError(
                422,
                "no_click_head",
                f"{model!r} has no click head to segment 'example' with; give the object's box in "
                "'positive_boxes' instead.",
            )
        positive = list(request.positive_boxes)
        exemplars_given = len(positive) + len(request.negative_boxes) + (request.example is not None)
        if request.text or not (positive or request.example is not None):
            phrases = check_phrases(request.text)
        else:
            phrases = [VISUAL]  # exemplars alone: Sam3Processor's own text for a prompt of boxes only
        if exemplars_given > MAX_EXEMPLARS:
            raise ApiError(
                422,
                "too_many_exemplars",
                f"{exemplars_given} exemplars (boxes and example); at most {MAX_EXEMPLARS} in all.",
            )
        # The concept features first: a fresh encode fills the click head's entry from the same pass.
        embedded = self._embedded(model, data, request.image_id, timings)
        height, width = embedded.embedding.original_size
        example = None
        if request.example is not None:
            example = self._example(model, data, embedded.image_id, request.example, timings)
            positive.append(example["box"])
        exemplars = check_exemplars(positive, request.negative_boxes, width, height)
        params = ConceptParams(
            score_threshold=request.score_threshold,
            mask_threshold=request.mask_threshold,
            max_instances=request.max_instances,
            nms_iou=request.nms_iou,
            masks=request.masks,
        )
        with timings.stage("concepts"):
            found = concepts.find(embedded.embedding, phrases, params, exemplars)
        tolerance = (
            self.settings.polygon_tolerance
            if request.polygon_tolerance is None
            else request.polygon_tolerance
        )
        with timings.stage("serialize"):
            instances = [
                render_instance(instance, request.formats, tolerance)
                for per_phrase in found
                for instance in per_phrase
            ]
        return {
            "image_id": embedded.image_id,
            "model": model,
            "width": width,
            "height": height,
            "cached": embedded.cached,
            "cache_tier": embedded.tier,
            "instances": instances,
            "counts": {phrase: len(per_phrase) for phrase, per_phrase in zip(phrases, found, strict=True)},
            "example": example,
        }

    def _example(
        self, model: str, data: bytes | None, image_id: str, example: ConceptExample, timings: Timings
    ) -> dict:
        """Click one, find all: the example object's best mask from the click head (as /segment answers the
        same prompts, on the image's cached click features) and its bounds, the exemplar box."""
        try:
            clicks = self.sam.cached_embedding(model, image_id, timings)
        except ApiError as missing:
            if missing.code != "image_not_cached" or data is None:
                raise ApiError(
                    404,
                    "image_not_cached",
                    f"No click features of image {image_id} for model {model!r} (evicted from the cache); "
                    "send the image itself in 'image'.",
                ) from None
            clicks = self.sam.embed(model, data, timings)  # cached concept features from before: a new pass
        prompts = SegmentRequest(
            image_id=image_id, points=example.points, labels=example.labels, box=example.box, refine=False
        )
        with timings.stage("example"):
            region, score = self.sam.predict_on(model, clicks, prompts, timings).masks[0]
        if region.is_empty:
            raise ApiError(
                422,
                "empty_example",
                "The example's mask is empty, so it gives no exemplar box: click inside the object, or give "
                "its box in 'positive_boxes'.",
            )
        x, y, w, h = region.tight().bbox_xywh()
        return {"box": [float(x), float(y), float(x + w), float(y + h)], "score": round(score, 6)}

    def _embedded(self, model: str, data: bytes | None, image_id: str | None, timings: Timings) -> Embedded:
        if data is not None:
            return self.sam.embed(model, data, timings, kind="concept")
        assert image_id is not None
        try:
            return self.sam.cached_embedding(model, image_id, timings, kind="concept")
        except ApiError as missing:
            if missing.code != "image_not_cached":
                raise
            raise ApiError(
                404,
                "image_not_cached",
                f"No features of image {image_id} for model {model!r} (never sent, or evicted from the "
                "cache); send the image itself in 'image', or prefetch it (POST /v1/prefetch) first.",
            ) from None

    def find_on_image(
        self,
        model: str,
        data: bytes,
        phrases: Sequence[str],
        params: ConceptParams,
        timings: Timings,
        decoded: np.ndarray | None = None,
    ) -> tuple[Embedded, list[list[Instance]]]:
        """The same for callers that validated their phrases already (CVAT functions, jobs)."""
        embedded = self.sam.embed(model, data, timings, decoded=decoded, kind="concept")
        with timings.stage("concepts"):
            found = self.registry.concept(model).find(embedded.embedding, phrases, params)
        return embedded, found


def check_phrases(text: Sequence[str]) -> list[str]:
    """The request's phrases, stripped and without repeats; 422 when one is empty or too long, or there are
    none or too many."""
    phrases = [phrase.strip() for phrase in text]
    if not phrases:
        raise ApiError(
            422,
            "no_prompt",
            "'text' is empty: give at least one noun phrase, e.g. [\"car\"], or a positive exemplar "
            "(positive_boxes or example) to find the objects like it.",
        )
    if len(phrases) > MAX_PHRASES:
        raise ApiError(
            422,
            "too_many_phrases",
            f"{len(phrases)} phrases in one request; at most {MAX_PHRASES}: split them over several requests "
            "with the same image_id (the image's features are cached).",
        )
    for i, phrase in enumerate(phrases):
        if not phrase:
            raise ApiError(422, "bad_text", f"text[{i}] is empty or only spaces; give a noun phrase.")
        if len(phrase) > MAX_PHRASE_CHARS:
            raise ApiError(
                422,
                "bad_text",
                f"text[{i}] is {len(phrase)} characters; a phrase is at most {MAX_PHRASE_CHARS} (the text "
                "encoder reads 32 tokens): give a short noun phrase.",
            )
        if any(ord(c) < 32 for c in phrase):
            raise ApiError(422, "bad_text", f"text[{i}] contains control characters.")
    return list(dict.fromkeys(phrases))


def check_exemplars(
    positive: Sequence[Sequence[float]], negative: Sequence[Sequence[float]], width: int, height: int
) -> Exemplars | None:
    """Exemplar boxes as Exemplars (None when there are none); 422 unless each is finite, not empty and inside
    the width × height image."""
    if len(positive) + len(negative) > MAX_EXEMPLARS:
        raise ApiError(422, "too_many_exemplars", f"at most {MAX_EXEMPLARS} exemplar boxes in all.")
    for what, boxes in (("positive_boxes", positive), ("negative_boxes", negative)):
        for i, box in enumerate(boxes):
            if not all(math.isfinite(v) for v in box):
                raise ApiError(422, "bad_prompt", f"{what}[{i}] contains NaN or infinite coordinates.")
            x1, y1, x2, y2 = box
            if not (x1 < x2 and y1 < y2):
                raise ApiError(
                    422,
                    "bad_prompt",
                    f"{what}[{i}] {list(box)} is empty or reversed; send [x1, y1, x2, y2] with x1 < x2 "
                    "and y1 < y2.",
                )
            if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
                raise ApiError(
                    422,
                    "prompt_outside_image",
                    f"{what}[{i}] {list(box)} is not inside the {width}x{height} image; exemplar boxes must "
                    f"lie within 0..{width} × 0..{height}.",
                )
    if not positive and not negative:
        return None
    return Exemplars.of(positive, negative)


def render_instance(instance: Instance, formats: Sequence[str], tolerance: float) -> dict:
    out: dict = {
        "prompt": instance.phrase,
        "score": round(instance.score, 6),
        "box": [round(v, 2) for v in instance.box],
    }
    if instance.mask is not None:
        out["mask"] = render_mask(instance.mask, formats, tolerance)
    return out
