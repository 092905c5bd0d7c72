"""The concept interface: "find every instance of this noun phrase" on an image whose features are cached.

A concept model is an ImageEncoder (its vision features go through the same cache tiers as SAM's embeddings,
services/embeddings/) plus a head that, given those features, one or more phrases and optional exemplar boxes,
answers every instance it finds per phrase: a box, a score and (when asked) a mask. Instances are thresholded,
de-duplicated (optional NMS) and capped *before* any mask is computed at image resolution, and a mask is
upsampled only where it can be positive (models/upsample.py), so a request costs what its answer holds.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.base import ImageEmbedding, ImageEncoder
from models.shapes import RegionMask
from models.vocabulary import MAX_EXEMPLARS, MAX_PHRASE_CHARS, MAX_PHRASES

__all__ = [
    "MAX_EXEMPLARS",
    "MAX_PHRASES",
    "MAX_PHRASE_CHARS",
    "ConceptModel",
    "ConceptParams",
    "Exemplars",
    "Instance",
]


@dataclass(frozen=True)
class ConceptParams:
    score_threshold: float = 0.5  # an instance's score (detection × presence) must exceed this
    mask_threshold: float = 0.5  # a pixel is in the mask where the upsampled probability exceeds this
    max_instances: int = 100  # per phrase, highest scores first
    nms_iou: float | None = None  # per-phrase NMS on the boxes at this IoU; None: none
    masks: bool = True  # False: boxes and scores only (no mask is upsampled)


@dataclass(frozen=True)
class Exemplars:
    """Example boxes in original-image pixels: positive ("like this") and negative ("not like this")."""

    boxes: np.ndarray  # [N, 4] float32 x1, y1, x2, y2, inside the image
    labels: np.ndarray  # [N] int64: 1 positive, 0 negative

    @classmethod
    def of(cls, positive: Sequence[Sequence[float]], negative: Sequence[Sequence[float]] = ()) -> Exemplars:
        boxes = [*positive, *negative]
        return cls(
            np.asarray(boxes, np.float32).reshape(-1, 4),
            np.asarray([1] * len(positive) + [0] * len(negative), np.int64),
        )

    def __len__(self) -> int:
        return len(self.boxes)


@dataclass(frozen=True)
class Instance:
    phrase: str  # the prompt that found it
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels, clipped to the image
    mask: RegionMask | None  # None when ConceptParams.masks is False


class ConceptModel(ImageEncoder):
    """Promptable concept segmentation (SAM 3's PCS) on cached image features."""

    @abstractmethod
    def find(
        self,
        embedding: ImageEmbedding,
        phrases: Sequence[str],
        params: ConceptParams,
        exemplars: Exemplars | None = None,
    ) -> list[list[Instance]]:
        """One list per phrase, best score first. Exemplars apply to every phrase."""

    @abstractmethod
    def text_cache_stats(self) -> dict:
        """The phrase embeddings kept: entries, bytes, hits, misses."""
