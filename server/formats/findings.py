"""A review's findings (likely label errors) and their JSON file: one ranked list, likeliest error first."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from models.shapes import RegionMask
from server.formats.files import FINDINGS_FILE, atomic, r2
from server.formats.rle import coco_rle

__all__ = ["FINDINGS_FILE", "Finding", "write_findings"]
# missing: an object the model is sure of has no annotation; badloc: an annotated box is off; swap: an
# annotated box has the wrong class; spurious: an annotated box covers nothing the model sees (labelserve's
# own check: ObjectLab gives such boxes a perfect score); sloppy_edge: SAM's mask disagrees with a mask or
# polygon annotation.
FindingKind = Literal["missing", "badloc", "swap", "spurious", "sloppy_edge"]
PREDICTIONS_NOTE = (
    "Findings are only meaningful when the detector was not trained on these labels: a model that learnt "
    "the labels agrees with their errors."
)


@dataclass(frozen=True)
class Finding:
    kind: FindingKind
    score: float  # 0..1, lower = more likely an error (ObjectLab's convention)
    frame: int  # the image's index in the job
    image: str  # the image's name
    label: str  # the annotated label (missing: the model's)
    shape_id: str | None  # the annotation's id in the source; None for a missing object
    box: tuple[float, float, float, float] | None  # the annotated shape's box (None for missing)
    suggested_box: tuple[float, float, float, float] | None  # the model's box, where it has one
    suggested_label: str | None = None  # swap: the model's class
    model_score: float | None = None  # the model's confidence in the suggested box
    iou: float | None = None  # sloppy_edge: IoU of SAM's mask and the annotated one
    suggested_mask: RegionMask | None = None  # sloppy_edge: SAM's mask

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "score": round(self.score, 6),
            "frame": self.frame,
            "image": self.image,
            "label": self.label,
            "shape_id": self.shape_id,
            "box": _box(self.box),
            "suggested_box": _box(self.suggested_box),
        }
        if self.suggested_label is not None:
            out["suggested_label"] = self.suggested_label
        if self.model_score is not None:
            out["model_score"] = round(self.model_score, 6)
        if self.iou is not None:
            out["iou"] = round(self.iou, 6)
        if self.suggested_mask is not None:
            out["suggested_mask"] = coco_rle(self.suggested_mask)  # COCO compressed RLE, the whole image
        return out


def write_findings(path: Path, findings: list[Finding], summary: dict[str, Any]) -> None:
    """`findings` in their (ranked) order, with `summary` (counts, detector, the out-of-sample note)."""
    document = {"summary": {**summary, "note": PREDICTIONS_NOTE}, "findings": [f.to_dict() for f in findings]}
    with atomic(path) as out:
        json.dump(document, out, ensure_ascii=False, indent=1)
        out.write("\n")


def _box(box: tuple[float, float, float, float] | None) -> list[float] | None:
    return None if box is None else [r2(v) for v in box]
