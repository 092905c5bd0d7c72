"""The detector interface: images in, internal shapes out, in batches."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from models.shapes import Shape

Task = Literal["detect", "segment", "pose", "obb", "classify"]


@dataclass(frozen=True)
class DetectParams:
    conf: float = 0.25
    iou: float = 0.7
    classes: tuple[int, ...] | None = None  # class ids to keep; None keeps all
    imgsz: int = 640
    max_det: int = 300
    # Sliced detection (models/tiling.py): the tile side in pixels, None for the whole image only; and the
    # share of a tile's side its neighbours overlap.
    tile: int | None = None
    tile_overlap: float = 0.2

    @classmethod
    def of(cls, fields: Any) -> DetectParams:
        """From anything with these fields, `classes` as a list: the API's DetectRequest, a job's params."""
        classes = tuple(fields.classes) if fields.classes is not None else None
        return cls(
            conf=fields.conf,
            iou=fields.iou,
            classes=classes,
            imgsz=fields.imgsz,
            max_det=fields.max_det,
            tile=fields.tile,
            tile_overlap=fields.tile_overlap,
        )


@dataclass(frozen=True)
class DetectorInfo:
    name: str
    task: Task
    class_names: dict[int, str]
    keypoint_names: tuple[str, ...] = ()  # pose models: the skeleton's points, in model order
    skeleton: tuple[tuple[int, int], ...] = field(default=())  # pose models: edges between keypoints


class Detector(ABC):
    info: DetectorInfo
    pools_features: bool = False  # whether pooled_features() is available

    @abstractmethod
    def detect(self, images: Sequence[np.ndarray], params: DetectParams) -> list[list[Shape]]:
        """One list of shapes per RGB uint8 image [H, W, 3], in full-image pixel-edge coordinates.
        Thread-safe; a batch of images runs as one forward pass where the backend allows it."""

    def pooled_features(self, images: Sequence[np.ndarray], imgsz: int) -> list[np.ndarray]:
        """One float32 feature vector per RGB uint8 image: the detector's own features, pooled over space
        (what a sample job's diversity compares). Only where `pools_features` is true."""
        raise NotImplementedError(f"{self.info.name!r} gives no pooled features")


TILE_DESCRIPTION = (
    "Sliced detection for large images: the side, in pixels, of overlapping tiles that are detected at full "
    "resolution besides the whole image (small objects that shrinking to imgsz would lose). Usually imgsz. "
    "Absent: the whole image only."
)
TILE_OVERLAP_DESCRIPTION = "Share of a tile's side that its neighbours overlap (with 'tile')."


def tiling_problem(info: DetectorInfo, params: DetectParams) -> str | None:
    """Why `params.tile` cannot apply to this detector, if it cannot."""
    if params.tile is not None and info.task == "classify":
        return f"{info.name!r} classifies whole images, not tiles of them; leave out 'tile'."
    return None


def run_detection(
    detector: Detector, images: Sequence[np.ndarray], params: DetectParams
) -> list[list[Shape]]:
    """How every caller runs a detector: `detect` as is, or sliced into tiles when `params.tile` is set."""
    if params.tile is None:
        return detector.detect(images, params)
    from models.tiling import detect_tiled

    return detect_tiled(detector.detect, images, params)
