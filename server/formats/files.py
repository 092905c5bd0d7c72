"""What the dataset writers share (stored results → CVAT for images 1.1 XML, COCO JSON, YOLO txt, and a
video job's CVAT for video and MOT): file names and paths, the label table, atomic writes, number formats.

Writers stream: they take a callable returning a fresh iterator of ImageResult (in item order), so millions
of images never sit in memory. Every file is written to a temporary name and renamed into place, and
nothing depends on when or by which job it was written: the same results give the same bytes.

Label ids: the detector's class ids first (DetectorInfo.class_names), then any other label in the order it
first appears. YOLO uses them as they are, COCO adds 1 (category 0 is background to many COCO tools).
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from models.detector import DetectorInfo
from models.shapes import Shape
from server.errors import ApiError

UNLABELED = "object"  # the label of a shape that came without one
COCO_FILE = "annotations.json"
CVAT_FILE = "annotations.xml"
YOLO_YAML = "data.yaml"
YOLO_LABELS = "labels"
MOT_GT = "gt/gt.txt"  # video jobs' formats: server.formats.cvat_video and server.formats.mot
MOT_LABELS = "gt/labels.txt"
MOT_SEQINFO = "seqinfo.ini"
FINDINGS_FILE = "findings.json"  # a review job's (server.formats.findings)
REVIEW_REPORT = "report.html"  # and its HTML report (server.formats.review_html)
RANKING_JSON, RANKING_CSV = "ranking.json", "ranking.csv"  # a sample job's (server.formats.ranking)


@dataclass(frozen=True)
class ImageResult:
    index: int  # position in the job's source: CVAT image id, COCO image id - 1
    name: str  # relative name, as in the CVAT task / dataset
    width: int
    height: int
    shapes: list[Shape]


Results = Callable[[], Iterable[ImageResult]]


def output_paths(fmt: str, directory: Path) -> list[Path]:
    return {
        "cvat_images": [directory / CVAT_FILE],
        "coco": [directory / COCO_FILE],
        "yolo": [directory / YOLO_YAML, directory / YOLO_LABELS],
        "cvat_video": [directory / CVAT_FILE],
        "mot": [directory / MOT_GT, directory / MOT_LABELS, directory / MOT_SEQINFO],
        "findings": [directory / FINDINGS_FILE, directory / REVIEW_REPORT],
        "ranking": [directory / RANKING_JSON, directory / RANKING_CSV],
    }[fmt]


def check_names(fmt: str, names: Iterable[str]) -> None:
    """Refuse sources whose images would overwrite each other in the output (ApiError 400)."""
    seen: dict[str, str] = {}
    for name in names:
        key = yolo_label_path(name) if fmt == "yolo" else name
        if key in seen:
            clash = f"{seen[key]!r} and {name!r}"
            raise ApiError(400, "duplicate_names", f"Images {clash} would get the same output name {key!r}.")
        seen[key] = name


def yolo_label_path(name: str) -> str:
    return PurePosixPath(name).with_suffix(".txt").as_posix()


# -- labels ----------------------------------------------------------------------------------------------


@dataclass
class LabelTable:
    """Label name → class id, growing in first-seen order past the detector's own classes."""

    ids: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, set[str]] = field(default_factory=dict)
    attributes: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def for_detector(cls, info: DetectorInfo) -> LabelTable:
        table = cls()
        for class_id, name in sorted(info.class_names.items()):
            table.ids.setdefault(name, class_id)
        return table

    def id_of(self, label: str) -> int:
        if label not in self.ids:
            self.ids[label] = max(self.ids.values(), default=-1) + 1
        return self.ids[label]

    def see(self, shape: Shape) -> int:
        label = label_of(shape)
        self.kinds.setdefault(label, set()).add(shape.kind)
        names = self.attributes.setdefault(label, [])
        names.extend(a for a in shape.attributes if a not in names)
        return self.id_of(label)

    def names(self) -> dict[int, str]:
        """id → name, with any gap in the ids filled so the ids run 0..n-1 (YOLO needs that)."""
        by_id = {i: n for n, i in sorted(self.ids.items(), key=lambda item: item[1])}
        return {i: by_id.get(i, f"class{i}") for i in range(max(by_id, default=-1) + 1)}


def label_of(shape: Shape) -> str:
    return shape.label if shape.label is not None else UNLABELED


def corners(shape: Shape) -> list[float]:
    """The 4 corners of a (rotated) box, clockwise on screen from the unrotated top-left."""
    assert shape.box is not None
    x1, y1, x2, y2 = shape.box
    cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    t = math.radians(shape.rotation)
    cos, sin = math.cos(t), math.sin(t)
    out: list[float] = []
    for dx, dy in ((-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh)):
        out += [cx + dx * cos - dy * sin, cy + dx * sin + dy * cos]
    return out


@contextmanager
def atomic(path: Path, sync: bool = True) -> Iterator[IO[str]]:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            yield f
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def r2(value: float) -> float:
    """Two decimals as a plain float (detectors hand numpy scalars, which JSON cannot encode)."""
    return round(float(value), 2)


def f2(value: float) -> str:
    return f"{value:.2f}"
