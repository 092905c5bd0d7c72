"""Multi-object tracking of detections with ultralytics' ByteTrack / BoT-SORT, fed frame by frame.

The tracker gets what ultralytics' own `model.track` gives it: each frame's boxes, scores and class ids as
float32, in the detector's order, so on the same detections its tracks are model.track's. Detection itself
runs batched through the Detector interface (the server's video jobs), which model.track cannot do. The
registry builds it (models.registry.multi_tracker), as every tracker.

A tracker's state is a few Python objects (Kalman states, the lost and removed tracks); `snapshot()` pickles
it whole and `MultiTracker(..., state=...)` restores it, for checkpoints in the job store (the server's own
data, read only by the server).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import cv2
import numpy as np

from models.detector import DetectorInfo
from models.shapes import Shape

TRACKED_TASKS = ("detect", "segment")  # detectors whose shapes are boxes or masks


class TrackerParams(Protocol):
    """What ultralytics reads from its tracker YAML (a video job's TrackerSpec: server/jobs/spec.py)."""

    type: Literal["bytetrack", "botsort"]
    track_high_thresh: float
    track_low_thresh: float
    new_track_thresh: float
    track_buffer: int
    match_thresh: float
    fuse_score: bool
    gmc_method: str


@dataclass(frozen=True)
class TrackedShape:
    track_id: int  # the tracker's id: unique within a job, not necessarily consecutive
    shape: Shape


class MultiTracker:
    def __init__(self, spec: TrackerParams, info: DetectorInfo, state: bytes | None = None) -> None:
        self.spec = spec
        self.info = info
        self._class_ids: dict[str, int] = {}
        for class_id, name in sorted(info.class_names.items()):
            self._class_ids.setdefault(name, class_id)
        self._tracker = pickle.loads(state) if state is not None else _new_tracker(spec)

    def update(self, image: np.ndarray, shapes: list[Shape]) -> list[TrackedShape]:
        """The objects tracked on this frame (RGB `image`), from its detections `shapes`, by track id."""
        from ultralytics.engine.results import Boxes

        rows, sources = [], []
        for shape in shapes:
            bounds = shape.bounds()
            if bounds is None or shape.score is None:
                continue
            rows.append([*bounds, shape.score, self._class_ids.get(shape.label or "", 0)])
            sources.append(shape)
        height, width = image.shape[:2]
        detections = Boxes(np.asarray(rows, dtype=np.float32).reshape(-1, 6), (height, width))
        # Only BoT-SORT looks at the frame (camera-motion compensation), in ultralytics' BGR.
        frame = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if self.spec.type == "botsort" else None
        tracked = self._tracker.update(detections, frame)
        found = []
        for x1, y1, x2, y2, track_id, score, class_id, index in tracked.reshape(-1, 8).tolist():
            source = sources[int(index)]
            label = self.info.class_names.get(int(class_id), source.label)
            if source.kind == "box":  # the tracker's box (its Kalman estimate), clipped as model.track does
                box = (_clip(x1, width), _clip(y1, height), _clip(x2, width), _clip(y2, height))
                shape = Shape("box", label=label, score=score, box=box)
            else:  # a mask stays the detection's own
                shape = replace(source, label=label, score=score)
            found.append(TrackedShape(int(track_id), shape))
        return sorted(found, key=lambda t: t.track_id)

    def snapshot(self) -> bytes:
        return pickle.dumps(self._tracker, protocol=pickle.HIGHEST_PROTOCOL)


def _clip(value: float, limit: int) -> float:
    return min(max(value, 0.0), float(limit))


def tracker_args(spec: TrackerParams) -> Any:
    """What ultralytics reads from its tracker YAML; ReID stays off (it needs another model)."""
    from ultralytics.utils import IterableSimpleNamespace

    return IterableSimpleNamespace(
        tracker_type=spec.type,
        track_high_thresh=spec.track_high_thresh,
        track_low_thresh=spec.track_low_thresh,
        new_track_thresh=spec.new_track_thresh,
        track_buffer=spec.track_buffer,
        match_thresh=spec.match_thresh,
        fuse_score=spec.fuse_score,
        gmc_method=spec.gmc_method,
        proximity_thresh=0.5,
        appearance_thresh=0.8,
        with_reid=False,
        model="auto",
    )


def _new_tracker(spec: TrackerParams) -> Any:
    from ultralytics.trackers import BOTSORT, BYTETracker

    return (BOTSORT if spec.type == "botsort" else BYTETracker)(args=tracker_args(spec))
