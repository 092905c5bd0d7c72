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
from server.schemas import ConceptRequest
from server.services.sam import Embedded, SamService
from server.settings import Settings


class ConceptService:
    def __init__(self, registry: ModelRegistry, sam: SamService, settings: Settings) -> None:
        self.registry = registry
        self.sam = sam  # its embedding tiers hold the concept models' vision features too
        self.settings = settings

    def find(self, model: str, data: bytes | None, request: ConceptRequest, timings: Timings) -> dict:
        concepts = self.registry.concept(model)
        phrases = check_phrases(request.text)
        if len(request.positive_boxes) + len(request.negative_boxes) > MAX_EXEMPLARS:
            raise ApiError(
                422,
                "too_many_exemplars",
                f"{len(request.positive_boxes) + len(request.negative_boxes)} exemplar boxes; at most "
                f"{MAX_EXEMPLARS} (positive and negative together).",
            )
        embedded = self._embedded(model, data, request.image_id, timings)
        height, width = embedded.embedding.original_size
        exemplars = check_exemplars(request.positive_boxes, request.negative_boxes, width, height)
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
        }

    def _embedded(self, model: str, data: bytes | None, image_id: str | None, timings: Timings) -> Embedded:
        if data is not None:
            return self.sam.embed(model, data, timings)
        assert image_id is not None
        try:
            return self.sam.cached_embedding(model, image_id, timings)
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
        embedded = self.sam.embed(model, data, timings, decoded=decoded)
        with timings.stage("concepts"):
            found = self.registry.concept(model).find(embedded.embedding, phrases, params)
        return embedded, found


def check_phrases(text: Sequence[str]) -> list[str]:
    """The request's phrases, stripped and without repeats; 422 when one is empty or too long, or there are
    none or too many."""
    phrases = [phrase.strip() for phrase in text]
    if not phrases:
        raise ApiError(422, "no_prompt", "'text' is empty: give at least one noun phrase, e.g. [\"car\"].")
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
