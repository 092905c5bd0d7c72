"""Ultralytics YOLO (detect, segment, pose, obb, classify) behind the Detector interface, fully offline."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from models.detector import Detector, DetectorInfo, DetectParams
from models.shapes import Keypoint, RegionMask, Shape

COCO_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
    "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
COCO_SKELETON = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9),
    (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)  # fmt: skip
KEYPOINT_VISIBLE = 0.5  # ultralytics' own threshold for drawing a keypoint


def configure_offline(config_dir: Path) -> None:
    """Before ultralytics is imported: no network probes, no auto-install, settings in our data dir."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))


def load_yolo(source: Path | str) -> Any:
    """A checkpoint path (full path: a bare name would make ultralytics download it) or a model YAML name."""
    from ultralytics import YOLO

    return YOLO(str(source))


class UltralyticsDetector(Detector):
    def __init__(self, name: str, model: Any, device: str, restore_threads: Callable[[], None]) -> None:
        self.model = model
        self.device = device
        self._restore_threads = restore_threads
        self._lock = threading.Lock()  # an ultralytics predictor holds per-call state
        task = model.task
        kpt_shape = (getattr(model.model, "yaml", None) or {}).get("kpt_shape") if task == "pose" else None
        keypoints: tuple[str, ...] = ()
        skeleton: tuple[tuple[int, int], ...] = ()
        if kpt_shape:
            count = int(kpt_shape[0])
            keypoints = COCO_KEYPOINTS if count == 17 else tuple(str(i + 1) for i in range(count))
            skeleton = COCO_SKELETON if count == 17 else ()
        self.info = DetectorInfo(
            name=name,
            task=task,
            class_names={int(k): str(v) for k, v in model.names.items()},
            keypoint_names=keypoints,
            skeleton=skeleton,
        )
        # ultralytics sets its predictor up on the first call, at 1 torch thread on a 2-core machine: do it
        # now, so the first real image is not slower, nor computed with another thread count than the rest.
        self._predict([np.zeros((64, 64, 3), np.uint8)], DetectParams())

    def detect(self, images: Sequence[np.ndarray], params: DetectParams) -> list[list[Shape]]:
        # Ultralytics letterboxes a batch of mixed sizes to a square canvas, but equal sizes (or one image)
        # to a minimal rectangle: running each size group on its own gives every image the letterbox of a
        # single-image predict, whatever it was batched with (micro-batching, jobs).
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            groups.setdefault(image.shape, []).append(index)
        out: list[list[Shape]] = [[] for _ in images]
        for indices in groups.values():
            found = self._predict([images[i] for i in indices], params)
            for index, shapes in zip(indices, found, strict=True):
                out[index] = shapes
        return out

    pools_features = True

    def pooled_features(self, images: Sequence[np.ndarray], imgsz: int) -> list[np.ndarray]:
        """ultralytics' `Model.embed`: the second-to-last layer's feature map, average-pooled per image (its
        BaseModel._predict_once), at the letterbox a single-image predict gives; one image per call, so a
        vector never depends on what it was batched with."""
        vectors = []
        for image in images:
            bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
            with self._lock:
                (found,) = self.model.embed([bgr], imgsz=imgsz, device=self.device, verbose=False)
                self._restore_threads()
            vectors.append(found.detach().float().cpu().numpy().astype(np.float32))
        return vectors

    def _predict(self, images: list[np.ndarray], params: DetectParams) -> list[list[Shape]]:
        # Ultralytics reads arrays as BGR. cvtColor, not a ::-1 copy: 22 against 106 ms for a 12 MP image.
        bgr = [cv2.cvtColor(image, cv2.COLOR_RGB2BGR) for image in images]
        with self._lock:
            results = self.model.predict(
                bgr,
                conf=params.conf,
                iou=params.iou,
                classes=list(params.classes) if params.classes is not None else None,
                imgsz=params.imgsz,
                max_det=params.max_det,
                device=self.device,
                verbose=False,
            )
            self._restore_threads()  # ultralytics lowers torch's thread count process-wide
        return [shapes_from_result(result, self.info, params.conf) for result in results]


def shapes_from_result(result: Any, info: DetectorInfo, conf: float) -> list[Shape]:
    """One ultralytics Results → internal shapes in original-image pixel-edge coordinates."""
    if result.probs is not None:
        return _tags(result, info, conf)
    if result.obb is not None:
        return _rotated_boxes(result, info)
    if result.keypoints is not None:
        return _skeletons(result, info)
    names = info.class_names
    boxes = _np(result.boxes.xyxy).reshape(-1, 4)
    labels = [names[int(c)] for c in _np(result.boxes.cls)]
    scores = [float(s) for s in _np(result.boxes.conf)]
    if result.masks is not None:
        height, width = result.orig_shape
        masks = _np(result.masks.data)
        return [
            Shape("mask", label=label, score=score, mask=_mask_in_box(mask, box, width, height))
            for mask, box, label, score in zip(masks, boxes, labels, scores, strict=True)
        ]
    return [
        Shape("box", label=label, score=score, box=(float(x1), float(y1), float(x2), float(y2)))
        for (x1, y1, x2, y2), label, score in zip(boxes, labels, scores, strict=True)
    ]


def _tags(result: Any, info: DetectorInfo, conf: float) -> list[Shape]:
    probs = _np(result.probs.data)
    order = np.argsort(-probs, kind="stable")
    keep = [int(i) for i in order if probs[i] >= conf] or [int(order[0])]  # the top class at least
    return [Shape("tag", label=info.class_names[i], score=float(probs[i])) for i in keep]


def _rotated_boxes(result: Any, info: DetectorInfo) -> list[Shape]:
    shapes = []
    for (cx, cy, w, h, radians), cls, score in zip(
        _np(result.obb.xywhr), _np(result.obb.cls), _np(result.obb.conf), strict=True
    ):
        box = (float(cx - w / 2), float(cy - h / 2), float(cx + w / 2), float(cy + h / 2))
        shapes.append(Shape("rotated_box", label=info.class_names[int(cls)], score=float(score), box=box,
                            rotation=math.degrees(float(radians))))  # fmt: skip
    return shapes


def _skeletons(result: Any, info: DetectorInfo) -> list[Shape]:
    xy = _np(result.keypoints.xy)
    kconf = _np(result.keypoints.conf) if result.keypoints.conf is not None else None
    names = [
        info.keypoint_names[k] if k < len(info.keypoint_names) else str(k + 1) for k in range(xy.shape[1])
    ]
    shapes = []
    for i, (cls, score) in enumerate(zip(_np(result.boxes.cls), _np(result.boxes.conf), strict=True)):
        points = []
        for k, (x, y) in enumerate(xy[i]):
            point_conf = float(kconf[i, k]) if kconf is not None else None
            visible = point_conf >= KEYPOINT_VISIBLE if point_conf is not None else bool(x or y)
            points.append(Keypoint(names[k], float(x), float(y), visible=visible, score=point_conf))
        shapes.append(
            Shape("keypoints", label=info.class_names[int(cls)], score=float(score), keypoints=points)
        )
    return shapes


def _np(tensor: Any) -> np.ndarray:
    return tensor.float().cpu().numpy()


def _mask_in_box(mask: np.ndarray, box: np.ndarray, width: int, height: int) -> RegionMask:
    """A mask at the letterboxed inference size → full resolution, computed only inside its box (ultralytics
    crops masks to their boxes too)."""
    in_h, in_w = mask.shape
    gain = min(in_h / height, in_w / width)
    pad_x, pad_y = (in_w - width * gain) / 2, (in_h - height * gain) / 2
    x0, y0 = max(int(math.floor(box[0])), 0), max(int(math.floor(box[1])), 0)
    x1, y1 = min(int(math.ceil(box[2])), width), min(int(math.ceil(box[3])), height)
    if x1 <= x0 or y1 <= y0:
        return RegionMask(np.zeros((0, 0), bool), 0, 0, width, height)
    # Output pixel (x, y) samples the inference mask at ((x + 0.5) * gain + pad - 0.5): half-pixel centres.
    affine = np.array(
        [[gain, 0.0, (x0 + 0.5) * gain + pad_x - 0.5], [0.0, gain, (y0 + 0.5) * gain + pad_y - 0.5]]
    )
    region = cv2.warpAffine(
        mask.astype(np.float32), affine, (x1 - x0, y1 - y0),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE,
    )  # fmt: skip
    return RegionMask(region > 0.5, x0, y0, width, height)
