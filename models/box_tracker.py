"""A weight-free box tracker for CPU-only hosts: Median Flow (Kalal et al., 2010) on OpenCV's pyramidal
Lucas-Kanade optical flow.

A grid of points inside the box is tracked forward to the next frame and back again. Points whose round trip
lands far from where they started (forward-backward error) or whose neighbourhood changed (normalised
cross-correlation) are dropped; the median displacement of the rest moves the box, and the median change of
their pairwise distances scales it. When the median round-trip error grows large, the object is missing
(occluded or gone): the tracker reports it lost rather than drifting onto the background, keeps predicting
where it would be at its last velocity, and re-acquires it by matching its last confident appearance
(normalised cross-correlation) around that prediction, as TLD-style trackers do after an occlusion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from models.shapes import Shape
from models.tracker import Frame, Tracker, TrackerInputError

_LK = {
    "winSize": (11, 11),
    "maxLevel": 3,
    "criteria": (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, 0.03),
}


@dataclass
class BoxState:
    gray: np.ndarray  # the previous frame, grey
    box: np.ndarray  # [x1, y1, x2, y2] float64, pixel-edge coordinates (predicted while missing)
    label: str | None
    size: tuple[int, int]  # (height, width) of the video
    anchor: np.ndarray  # grey appearance on the first frame: what the object looks like, never updated
    template: np.ndarray  # grey appearance at the last frame it still looked like the anchor
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(2))  # pixels per frame, smoothed
    missing: int = 0  # frames since the object was last seen


class MedianFlowTracker(Tracker):
    name = "medianflow"
    accepts = ("box", "polygon", "mask")

    def __init__(
        self,
        grid: int = 10,
        max_fb_error: float = 4.0,
        min_points: int = 8,
        reacquire_score: float = 0.6,
        lost_score: float = 0.4,
        max_missing: int = 60,
    ) -> None:
        self.grid = grid
        self.max_fb_error = max_fb_error
        self.min_points = min_points
        self.reacquire_score = reacquire_score
        self.lost_score = lost_score
        self.max_missing = max_missing

    def init(self, frame: Frame, shape: Shape) -> BoxState:
        box = _shape_box(shape, frame.size)
        gray = _gray(frame.image)
        appearance = _crop(gray, box)
        return BoxState(gray, box, shape.label, frame.size, appearance, appearance)

    def step(self, state: BoxState, frame: Frame) -> Shape | None:
        if frame.size != state.size:
            raise TrackerInputError(
                f"frame size {frame.size[1]}x{frame.size[0]} differs from the tracked video's "
                f"{state.size[1]}x{state.size[0]}; start a new track for another video"
            )
        gray = _gray(frame.image)
        if state.missing:
            moved = self._reacquire(state, gray)
        else:
            moved = self._flow(state.gray, gray, state.box)
            if moved is not None:
                shift = (moved[:2] + moved[2:]) / 2 - (state.box[:2] + state.box[2:]) / 2
                state.velocity = 0.7 * state.velocity + 0.3 * shift
                # Flow can follow the front of an occluder; the object's own appearance must still be there.
                if _visible_similarity(gray, moved, state.anchor) < self.lost_score:
                    moved = None
        state.gray = gray
        if moved is None:
            state.missing += 1
            state.box = state.box + np.tile(state.velocity, 2)  # where it would be now
            return None
        height, width = state.size
        clipped = np.clip(moved, [0, 0, 0, 0], [width, height, width, height])
        area = (moved[2] - moved[0]) * (moved[3] - moved[1])
        state.box = moved
        if (clipped[2] - clipped[0]) * (clipped[3] - clipped[1]) < 0.25 * area:
            state.missing = self.max_missing + 1  # mostly outside the frame: it has left for good
            return None
        crop = _crop(gray, clipped)
        if _similarity(crop, state.anchor) >= self.reacquire_score:
            state.template = crop  # follows slow changes of appearance, without drifting onto an occluder
        state.missing = 0
        return Shape("box", label=state.label, box=tuple(float(v) for v in clipped))

    def state_bytes(self, state: BoxState) -> int:
        return int(state.gray.nbytes + state.anchor.nbytes + state.template.nbytes) + 256

    def _reacquire(self, state: BoxState, gray: np.ndarray) -> np.ndarray | None:
        """Look for the last confident appearance around where the object would be by now."""
        if state.missing > self.max_missing:
            return None
        box = state.box + np.tile(state.velocity, 2)
        w, h = box[2] - box[0], box[3] - box[1]
        height, width = gray.shape
        x0, y0 = int(max(box[0] - w, 0)), int(max(box[1] - h, 0))
        x1, y1 = int(min(box[2] + w, width)), int(min(box[3] + h, height))
        best, found = self.reacquire_score, None
        for scale in (0.9, 1.0, 1.1, 1.25):  # it may have grown or shrunk while hidden
            tw, th = max(int(round(w * scale)), 4), max(int(round(h * scale)), 4)
            if x1 - x0 <= tw or y1 - y0 <= th:
                continue
            template = cv2.resize(state.template, (tw, th), interpolation=cv2.INTER_LINEAR)
            scores = cv2.matchTemplate(gray[y0:y1, x0:x1], template, cv2.TM_CCOEFF_NORMED)
            _, score, _, (bx, by) = cv2.minMaxLoc(scores)
            if score >= best:
                best, found = score, np.array([x0 + bx, y0 + by, x0 + bx + tw, y0 + by + th], np.float64)
        return found

    def _flow(self, previous: np.ndarray, current: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        x1, y1, x2, y2 = box
        margin = 0.1  # points on the box edge often sit on the background
        xs = np.linspace(x1 + margin * (x2 - x1), x2 - margin * (x2 - x1), self.grid)
        ys = np.linspace(y1 + margin * (y2 - y1), y2 - margin * (y2 - y1), self.grid)
        points = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 1, 2).astype(np.float32)
        forward, ok_f, _ = cv2.calcOpticalFlowPyrLK(previous, current, points, None, **_LK)
        back, ok_b, _ = cv2.calcOpticalFlowPyrLK(current, previous, forward, None, **_LK)
        ok = (ok_f[:, 0] == 1) & (ok_b[:, 0] == 1)
        if ok.sum() < self.min_points:
            return None
        start, end = points[ok, 0].astype(np.float64), forward[ok, 0].astype(np.float64)
        fb_error = np.linalg.norm(start - back[ok, 0], axis=1)
        ncc = _ncc(previous, current, start, end)
        keep = (fb_error <= np.median(fb_error)) & (ncc >= np.median(ncc))
        if keep.sum() < self.min_points // 2 or np.median(fb_error) > self.max_fb_error:
            return None
        start, end = start[keep], end[keep]
        shift = np.median(end - start, axis=0)
        scale = _median_scale(start, end)
        cx, cy = (x1 + x2) / 2 + shift[0], (y1 + y2) / 2 + shift[1]
        half_w, half_h = (x2 - x1) * scale / 2, (y2 - y1) * scale / 2
        return np.array([cx - half_w, cy - half_h, cx + half_w, cy + half_h])


def _gray(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def _similarity(patch: np.ndarray, template: np.ndarray) -> float:
    """Normalised cross-correlation of two appearances, at the template's size."""
    if patch.shape[0] < 4 or patch.shape[1] < 4:
        return 0.0
    resized = cv2.resize(patch, (template.shape[1], template.shape[0]), interpolation=cv2.INTER_LINEAR)
    return float(cv2.matchTemplate(resized, template, cv2.TM_CCOEFF_NORMED)[0, 0])


def _visible_similarity(gray: np.ndarray, box: np.ndarray, anchor: np.ndarray) -> float:
    """Similarity of the box's inside to the anchor, over the part of the box that is inside the frame."""
    height, width = gray.shape
    x1, y1, x2, y2 = box
    w, h = max(x2 - x1, 1e-6), max(y2 - y1, 1e-6)
    # The in-frame part of the box, as fractions of the box.
    fx0, fy0 = (max(x1, 0) - x1) / w, (max(y1, 0) - y1) / h
    fx1, fy1 = (min(x2, width) - x1) / w, (min(y2, height) - y1) / h
    if fx1 - fx0 < 0.2 or fy1 - fy0 < 0.2:
        return 0.0
    ah, aw = anchor.shape
    part = anchor[
        int(fy0 * ah) : max(int(fy1 * ah), int(fy0 * ah) + 1), int(fx0 * aw) : max(int(fx1 * aw), 1)
    ]
    return _similarity(_crop(gray, np.clip(box, 0, [width, height, width, height])), part)


def _crop(gray: np.ndarray, box: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return gray[max(y1, 0) : max(y2, y1 + 1), max(x1, 0) : max(x2, x1 + 1)].copy()


def _median_scale(start: np.ndarray, end: np.ndarray) -> float:
    i, j = np.triu_indices(len(start), k=1)
    before = np.linalg.norm(start[i] - start[j], axis=1)
    after = np.linalg.norm(end[i] - end[j], axis=1)
    valid = before > 1e-6
    return float(np.median(after[valid] / before[valid])) if valid.any() else 1.0


def _ncc(previous: np.ndarray, current: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Normalised cross-correlation of the 10x10 patches around each point before and after."""
    out = np.empty(len(start))
    for index, (a, b) in enumerate(zip(start, end, strict=True)):
        pa = cv2.getRectSubPix(previous, (10, 10), (float(a[0]), float(a[1])))
        pb = cv2.getRectSubPix(current, (10, 10), (float(b[0]), float(b[1])))
        out[index] = cv2.matchTemplate(pa, pb, cv2.TM_CCOEFF_NORMED)[0, 0]
    return out


def _shape_box(shape: Shape, size: tuple[int, int]) -> np.ndarray:
    """The box to follow: a box as given, or the bounding box of a polygon or mask."""
    if shape.kind == "box" and shape.box is not None:
        box = np.array(shape.box, np.float64)
    elif shape.kind == "polygon" and shape.polygon:
        xy = np.asarray(shape.polygon, np.float64).reshape(-1, 2)
        box = np.array([*xy.min(0), *xy.max(0)])
    elif shape.kind == "mask" and shape.mask is not None:
        bbox = shape.mask.bbox_xyxy_inclusive()
        if bbox is None:
            raise TrackerInputError("the mask to track is empty")
        box = np.array(bbox, np.float64) + [0, 0, 1, 1]  # inclusive pixels → pixel edges
    else:
        raise TrackerInputError(
            f"the box tracker follows boxes, polygons and masks, not {shape.kind!r} shapes"
        )
    height, width = size
    box = np.clip(box, [0, 0, 0, 0], [width, height, width, height])
    if box[2] - box[0] < 2 or box[3] - box[1] < 2:
        raise TrackerInputError("the shape to track is empty or smaller than 2 pixels inside the frame")
    return box
