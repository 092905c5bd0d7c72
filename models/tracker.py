"""The single-object tracker interface: a shape on one frame in, that object's shape on each next frame out.

A tracker's state is a plain Python object that lives server-side (CVAT round-trips only an id through the
browser), so it may hold anything: an OpenCV tracker, a SAM 2 memory bank, the previous mask's logits. Each
state belongs to one object of one video, and frames are fed to it in order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.base import ImageEmbedding
from models.shapes import Shape


class TrackerInputError(ValueError):
    """The shape or frame cannot be tracked (wrong kind, empty, other frame size); the caller's fault: 4xx."""


@dataclass(frozen=True)
class Frame:
    """One decoded RGB frame; `content_id` (sha256 of the encoded bytes, or any stable id) keys caches."""

    image: np.ndarray  # [H, W, 3] uint8 RGB
    content_id: str

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)"""
        return int(self.image.shape[0]), int(self.image.shape[1])


class Tracker(ABC):
    name: str
    # Shape kinds `init` accepts, and the kind `step` returns for each (CVAT: rectangle, polygon, mask).
    accepts: tuple[str, ...]

    @abstractmethod
    def init(self, frame: Frame, shape: Shape) -> Any:
        """Start following `shape` on `frame`; returns the state for `step`. Raises TrackerInputError."""

    @abstractmethod
    def step(self, state: Any, frame: Frame) -> Shape | None:
        """The object on the next frame, or None once it is lost; updates `state` in place."""

    def state_bytes(self, state: Any) -> int:
        """Rough memory held by one state, for the server-side store's byte cap."""
        return 64 * 1024

    def on_embeddings(self, embed: Callable[[Frame], ImageEmbedding]) -> Tracker | None:
        """This tracker taking each frame's features from `embed` (the cached embeddings of the segmenter
        of the same model), or None when it encodes frames in its own way."""
        return None
