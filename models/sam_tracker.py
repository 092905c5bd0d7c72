"""SAM mask propagation: the object's mask on frame N prompts SAM on frame N+1.

Each step prompts the new frame with the previous mask's box (widened for motion), a few points deep inside
the previous mask, and the previous low-resolution logits as the dense mask prompt, then keeps the best mask.
Embeddings come from the server's cache through `embed`, so frames visited again (scrubbing back and forth in
CVAT, several objects on one frame) are encoded once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from models.base import ImageEmbedding, Prompt, Segmenter
from models.shapes import RegionMask, Shape, mask_from_polygon
from models.tracker import Frame, Tracker, TrackerInputError

Embed = Callable[[Frame], ImageEmbedding]


@dataclass
class MaskState:
    mask: RegionMask
    logits: torch.Tensor  # [1, 256, 256] low-resolution logits of `mask`
    label: str | None
    size: tuple[int, int]  # (height, width)


class SamPropagationTracker(Tracker):
    accepts = ("box", "polygon", "mask")

    def __init__(
        self, segmenter: Segmenter, embed: Embed, points: int = 3, margin: float = 0.1, min_score: float = 0.0
    ) -> None:
        self.name = f"{segmenter.name}-propagate"
        self.segmenter = segmenter
        self._embed = embed
        self.points = points
        self.margin = margin
        self.min_score = min_score

    def init(self, frame: Frame, shape: Shape) -> MaskState:
        height, width = frame.size
        embedding = self._embed(frame)
        if shape.kind == "box" and shape.box is not None:
            # A box is only a prompt: the object's mask on the first frame is SAM's answer to it.
            box = np.clip(np.array(shape.box, np.float32), 0, [width, height, width, height])
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                raise TrackerInputError("the box to track is empty inside the frame")
            prompt = Prompt(np.zeros((0, 2), np.float32), np.zeros(0, np.int32), box)
            decoded = self.segmenter.decode(embedding, prompt, multimask=False)
            logits = decoded.low_res_logits[:1]
            mask = self.segmenter.upsample(embedding, logits[0])
        else:
            mask = _shape_mask(shape, width, height)
            logits = self.segmenter.low_res_from_mask(embedding, mask)
        if mask.bbox_xyxy_inclusive() is None:
            raise TrackerInputError("the shape to track covers no pixel of the frame")
        return MaskState(mask, logits, shape.label, frame.size)

    def step(self, state: MaskState, frame: Frame) -> Shape | None:
        if frame.size != state.size:
            raise TrackerInputError(
                f"frame size {frame.size[1]}x{frame.size[0]} differs from the tracked video's "
                f"{state.size[1]}x{state.size[0]}; start a new track for another video"
            )
        embedding = self._embed(frame)
        prompt = self.prompt_from(state)
        decoded = self.segmenter.decode(embedding, prompt, multimask=False)
        mask = self.segmenter.upsample(embedding, decoded.low_res_logits[0])
        score = float(decoded.scores[0])
        if mask.bbox_xyxy_inclusive() is None or score < self.min_score:
            return None
        state.mask, state.logits = mask, decoded.low_res_logits[:1]
        return Shape("mask", label=state.label, score=score, mask=mask)

    def prompt_from(self, state: MaskState) -> Prompt:
        """The next frame's prompt: the previous mask's widened box, interior points, and its logits."""
        height, width = state.size
        x1, y1, x2, y2 = state.mask.bbox_xyxy_inclusive() or (0, 0, width - 1, height - 1)
        dx, dy = self.margin * (x2 - x1 + 1), self.margin * (y2 - y1 + 1)
        box = np.array([x1 - dx, y1 - dy, x2 + 1 + dx, y2 + 1 + dy], np.float32)
        box = np.clip(box, 0, [width, height, width, height])
        points = _interior_points(state.mask, self.points)
        return Prompt(points, np.ones(len(points), np.int32), box, state.logits)

    def state_bytes(self, state: MaskState) -> int:
        return int(state.mask.bitmap.nbytes + state.logits.numel() * 4) + 256


def _shape_mask(shape: Shape, width: int, height: int) -> RegionMask:
    if shape.kind == "mask" and shape.mask is not None:
        if (shape.mask.image_width, shape.mask.image_height) != (width, height):
            raise TrackerInputError("the mask to track is not the size of the frame")
        return shape.mask
    if shape.kind == "polygon" and shape.polygon:
        return mask_from_polygon(shape.polygon, width, height)
    raise TrackerInputError(f"SAM propagation follows boxes, polygons and masks, not {shape.kind!r} shapes")


def _interior_points(mask: RegionMask, count: int) -> np.ndarray:
    """Up to `count` points deepest inside the mask (distance-transform maxima, kept apart)."""
    bitmap = np.pad(mask.bitmap.astype(np.uint8), 1)
    depth = cv2.distanceTransform(bitmap, cv2.DIST_L2, 5)[1:-1, 1:-1]
    points = []
    for _ in range(count):
        y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
        radius = float(depth[y, x])
        if radius <= 0:
            break
        points.append((mask.x0 + x + 0.5, mask.y0 + y + 0.5))
        cv2.circle(depth, (int(x), int(y)), max(int(radius), 1), 0, -1)  # the next point lies elsewhere
    return np.array(points, np.float32).reshape(-1, 2)
