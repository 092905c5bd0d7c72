"""The detector interface: images in, internal shapes out, in batches."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from server.shapes import Shape

Task = Literal["detect", "segment", "pose", "obb", "classify"]


@dataclass(frozen=True)
class DetectParams:
    conf: float = 0.25
    iou: float = 0.7
    classes: tuple[int, ...] | None = None  # class ids to keep; None keeps all
    imgsz: int = 640
    max_det: int = 300


@dataclass(frozen=True)
class DetectorInfo:
    name: str
    task: Task
    class_names: dict[int, str]
    keypoint_names: tuple[str, ...] = ()  # pose models: the skeleton's points, in model order
    skeleton: tuple[tuple[int, int], ...] = field(default=())  # pose models: edges between keypoints


class Detector(ABC):
    info: DetectorInfo

    @abstractmethod
    def detect(self, images: Sequence[np.ndarray], params: DetectParams) -> list[list[Shape]]:
        """One list of shapes per RGB uint8 image [H, W, 3], in full-image pixel-edge coordinates.
        Thread-safe; a batch of images runs as one forward pass where the backend allows it."""
