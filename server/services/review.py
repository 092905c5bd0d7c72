"""Scoring annotations against a detector's predictions: likely label errors, as one ranked list.

Boxes are scored with cleanlab's ObjectLab (`cleanlab.object_detection.rank`): a score per predicted box for
"missing" (overlooked), and per annotated box for "badloc" and "swap"; lower is worse. This module is the
adapter ObjectLab asks its users to write:
- detections are regrouped per class (ObjectLab's `predictions[i][k]` is an (M_k, 5) array), and each
  regrouped row remembers the detection it came from, each annotated row the shape id it came from;
- images with no annotations or no detections are scored like any other (empty arrays);
- an annotated box that no detection overlaps gets ObjectLab's perfect score; labelserve flags it
  "spurious", scored by the best IoU × confidence of any detection over it.

Each annotated shape gives at most one finding (its lowest-scoring kind). Predictions must come from a model
that was not trained on these labels, or the scores say nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from models.shapes import RegionMask, Shape, mask_from_polygon
from server.formats.annotations import Annotation
from server.formats.findings import Finding

BADLOC_PROB = 0.5  # ObjectLab's LOW_PROBABILITY_THRESHOLD: the detections badloc compares with


@dataclass(frozen=True)
class ImageInput:
    frame: int
    name: str
    annotations: list[Annotation]  # in pixels, labels named as in `classes`
    predictions: list[Shape]  # the detector's, labels named as in `classes` (others dropped)
    sam_masks: dict[str, RegionMask] = field(default_factory=dict)  # annotation id -> SAM's mask from its box


@dataclass(frozen=True)
class ObjectLabInputs:
    """ObjectLab's labels and predictions for a list of images, and the way back to the shapes."""

    labels: list[dict[str, np.ndarray]]
    predictions: list[list[np.ndarray]]
    pred_rows: list[list[int]]  # per image: the detection index of each regrouped prediction row


def objectlab_inputs(images: Sequence[ImageInput], classes: Sequence[str]) -> ObjectLabInputs:
    index = {name: k for k, name in enumerate(classes)}
    width = len(classes)
    labels, predictions, pred_rows = [], [], []
    for image in images:
        boxes = [_box(a.shape) for a in image.annotations]
        labels.append(
            {
                "bboxes": np.array(boxes, dtype=np.float64).reshape(-1, 4),
                "labels": np.array([index[a.shape.label or ""] for a in image.annotations], dtype=np.int64),
            }
        )
        per_class: list[list[list[float]]] = [[] for _ in range(width)]
        rows: list[list[int]] = [[] for _ in range(width)]
        for i, shape in enumerate(image.predictions):
            k = index.get(shape.label or "")
            if k is None:
                continue
            per_class[k].append([*_box(shape), float(shape.score if shape.score is not None else 1.0)])
            rows[k].append(i)
        predictions.append([np.array(p, dtype=np.float64).reshape(-1, 5) for p in per_class])
        pred_rows.append([i for r in rows for i in r])
    return ObjectLabInputs(labels, predictions, pred_rows)


def score_boxes(
    images: Sequence[ImageInput], classes: Sequence[str], max_score: float = 0.9
) -> list[Finding]:
    """Every finding scoring below `max_score`, most likely error first (ties in frame, then shape order)."""
    from cleanlab.object_detection import rank  # pandas and sklearn: only review jobs pay for the import

    if not images:
        return []
    inputs = objectlab_inputs(images, classes)
    kwargs = {"labels": inputs.labels, "predictions": inputs.predictions}
    overlooked = rank.compute_overlooked_box_scores(**kwargs)
    badloc = rank.compute_badloc_box_scores(**kwargs)
    swap = rank.compute_swap_box_scores(**kwargs)
    findings: list[Finding] = []
    for i, image in enumerate(images):
        preds = [image.predictions[j] for j in inputs.pred_rows[i]]
        pred_boxes = np.array([_box(p) for p in preds], dtype=np.float64).reshape(-1, 4)
        probs = np.array([p.score if p.score is not None else 1.0 for p in preds], dtype=np.float64)
        for row, score in enumerate(overlooked[i]):
            if np.isfinite(score) and score < max_score:
                p = preds[row]
                findings.append(
                    Finding("missing", float(score), image.frame, image.name, p.label or "", None, None,
                            _box(p), model_score=probs[row])
                )  # fmt: skip
        for row, annotation in enumerate(image.annotations):
            box = _box(annotation.shape)
            iou = _iou(np.array(box), pred_boxes)
            same = np.array([p.label == annotation.shape.label for p in preds], dtype=bool)
            candidates: list[Finding] = []
            base = {"frame": image.frame, "image": image.name, "label": annotation.shape.label or "",
                    "shape_id": annotation.shape_id, "box": box}  # fmt: skip
            if badloc[i][row] < 1.0:
                best = _best(iou, same & (probs > BADLOC_PROB))
                candidates.append(
                    Finding("badloc", float(badloc[i][row]), suggested_box=_box(preds[best]),
                            model_score=float(probs[best]), **base)
                )  # fmt: skip
            else:  # no confident same-class detection overlaps it: does any detection see something there?
                support = iou * probs
                best = int(np.argmax(support)) if support.size else -1
                candidates.append(
                    Finding("spurious", float(support[best]) if best >= 0 else 0.0, suggested_box=None,
                            model_score=float(probs[best]) if best >= 0 else None, **base)
                )  # fmt: skip
            if swap[i][row] < 1.0:
                best = _best(iou, ~same)
                candidates.append(
                    Finding("swap", float(swap[i][row]), suggested_box=_box(preds[best]),
                            suggested_label=preds[best].label, model_score=float(probs[best]), **base)
                )  # fmt: skip
            worst = min(candidates, key=lambda f: f.score)
            if worst.score < max_score:
                findings.append(worst)
    return rank_findings(findings)


def score_edges(images: Sequence[ImageInput], max_score: float = 0.9) -> list[Finding]:
    """A "sloppy_edge" finding for each polygon or mask annotation whose IoU with SAM's mask (prompted with
    the annotation's box) is below `max_score`; the score is that IoU."""
    findings = []
    for image in images:
        for annotation in image.annotations:
            sam = image.sam_masks.get(annotation.shape_id)
            if sam is None:
                continue
            iou = mask_iou(annotated_mask(annotation.shape, sam.image_width, sam.image_height), sam)
            if iou < max_score:
                findings.append(
                    Finding("sloppy_edge", iou, image.frame, image.name, annotation.shape.label or "",
                            annotation.shape_id, _box(annotation.shape), _box(Shape("mask", mask=sam)),
                            iou=iou, suggested_mask=sam)
                )  # fmt: skip
    return rank_findings(findings)


def annotated_mask(shape: Shape, width: int, height: int) -> RegionMask:
    if shape.mask is not None:
        return shape.mask
    assert shape.polygon is not None
    return mask_from_polygon(shape.polygon, width, height)


def mask_iou(a: RegionMask, b: RegionMask) -> float:
    """IoU of two masks of the same image, computed over the union of their boxes only."""
    boxes = [m.bbox_xyxy_inclusive() for m in (a, b)]
    if boxes[0] is None or boxes[1] is None:
        return 0.0
    x0, y0 = min(boxes[0][0], boxes[1][0]), min(boxes[0][1], boxes[1][1])
    x1, y1 = max(boxes[0][2], boxes[1][2]) + 1, max(boxes[0][3], boxes[1][3]) + 1
    crops = [m.to_full()[y0:y1, x0:x1] for m in (a, b)]
    union = np.logical_or(*crops).sum()
    return float(np.logical_and(*crops).sum() / union) if union else 0.0


def rank_findings(findings: list[Finding]) -> list[Finding]:
    """Lowest score first; stable, so equal scores keep frame order."""
    return sorted(findings, key=lambda f: f.score)


def _best(iou: np.ndarray, allowed: np.ndarray) -> int:
    masked = np.where(allowed, iou, -1.0)
    return int(np.argmax(masked))


def _box(shape: Shape) -> tuple[float, float, float, float]:
    bounds = shape.bounds()
    assert bounds is not None, "an annotation without geometry"
    return tuple(float(v) for v in bounds)  # type: ignore[return-value]


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    if boxes.size == 0:
        return np.zeros(0)
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)
