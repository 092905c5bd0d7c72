"""Stored results → dataset files: CVAT for images 1.1 XML, COCO JSON, YOLO txt (ultralytics layout).

Writers stream: they take a callable returning a fresh iterator of ImageResult (in item order), so millions
of images never sit in memory. Every file is written to a temporary name and renamed into place, and
nothing depends on when or by which job it was written: the same results give the same bytes.

Label ids: the detector's class ids first (DetectorInfo.class_names), then any other label in the order it
first appears. YOLO uses them as they are, COCO adds 1 (category 0 is background to many COCO tools).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any
from xml.sax.saxutils import XMLGenerator

from models.detector import DetectorInfo
from models.shapes import Shape, polygons
from server.errors import ApiError
from server.masks import coco_rle, cvat_rle

UNLABELED = "object"  # the label of a shape that came without one
COCO_FILE = "annotations.json"
CVAT_FILE = "annotations.xml"
YOLO_YAML = "data.yaml"
YOLO_LABELS = "labels"
MOT_GT = "gt/gt.txt"  # video jobs' formats are written by server.jobs.video_writers
MOT_LABELS = "gt/labels.txt"
MOT_SEQINFO = "seqinfo.ini"


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


def write_output(
    fmt: str, directory: Path, info: DetectorInfo, results: Results, polygon_tolerance: float = 1.0
) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "cvat_images":
        write_cvat_images(directory / CVAT_FILE, info, results)
    elif fmt == "coco":
        write_coco(directory / COCO_FILE, info, results)
    elif fmt == "yolo":
        write_yolo(directory, info, results, polygon_tolerance)
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    return output_paths(fmt, directory)


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


def _corners(shape: Shape) -> list[float]:
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


def _polygon_area(flat: list[float]) -> float:
    xs, ys = flat[0::2], flat[1::2]
    n = len(xs)
    return abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))) / 2


@contextmanager
def _atomic(path: Path, sync: bool = True) -> Iterator[IO[str]]:
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


def _r(value: float) -> float:
    """Two decimals as a plain float (detectors hand numpy scalars, which JSON cannot encode)."""
    return round(float(value), 2)


def _f2(value: float) -> str:
    return f"{value:.2f}"


# -- CVAT for images 1.1 ---------------------------------------------------------------------------------


class _Xml:
    """CVAT's own layout: two-space indentation, one element per line (its XmlAnnotationWriter)."""

    def __init__(self, out: IO[str]) -> None:
        self.gen = XMLGenerator(out, "utf-8")
        self.level = 0

    def open(self, tag: str, attrs: dict[str, str] | None = None) -> None:
        self.gen.ignorableWhitespace("\n" + "  " * self.level)
        self.gen.startElement(tag, attrs or {})
        self.level += 1

    def close(self, tag: str) -> None:
        self.level -= 1
        self.gen.ignorableWhitespace("\n" + "  " * self.level)
        self.gen.endElement(tag)

    def leaf(self, tag: str, text: str = "", attrs: dict[str, str] | None = None) -> None:
        self.gen.ignorableWhitespace("\n" + "  " * self.level)
        self.gen.startElement(tag, attrs or {})
        self.gen.characters(text)
        self.gen.endElement(tag)


def write_cvat_images(path: Path, info: DetectorInfo, results: Results) -> None:
    """CVAT for images 1.1. Masks follow CVAT's exporter (cvat/apps/dataset_manager/formats/cvat.py):
    `rle` holds the CVAT RLE runs over the mask's own inclusive box, which `left`, `top`, `width`, `height`
    give. Scores have no place in CVAT XML and are left out; shape attributes become <attribute>s."""
    table = LabelTable.for_detector(info)
    skeleton_points: list[str] = list(info.keypoint_names)
    size = 0
    for result in results():  # first pass: the labels, attributes and skeleton points <meta> declares
        size += 1
        for shape in result.shapes:
            table.see(shape)
            if shape.kind == "keypoints" and not skeleton_points:
                skeleton_points = [k.name for k in shape.keypoints or []]

    with _atomic(path) as out:
        xml = _Xml(out)
        xml.gen.startDocument()
        xml.open("annotations")
        xml.leaf("version", "1.1")
        xml.open("meta")
        xml.open("task")
        xml.leaf("size", str(size))
        xml.leaf("mode", "annotation")
        xml.open("labels")
        for name in table.ids:
            is_skeleton = "keypoints" in table.kinds.get(name, ())
            _cvat_label(xml, name, "skeleton" if is_skeleton else "any", table.attributes.get(name, []))
            if is_skeleton:
                for point in skeleton_points:
                    _cvat_label(xml, point, "points", [], parent=name)
        xml.close("labels")
        xml.close("task")
        xml.close("meta")
        for result in results():
            attrs = {"id": str(result.index), "name": result.name}
            xml.open("image", attrs | {"width": str(result.width), "height": str(result.height)})
            for shape in result.shapes:
                if shape.kind != "tag":
                    _cvat_shape(xml, shape)
            for shape in result.shapes:
                if shape.kind == "tag":  # CVAT puts tags after the shapes
                    xml.open("tag", {"label": label_of(shape), "source": "auto"})
                    _cvat_attributes(xml, shape)
                    xml.close("tag")
            xml.close("image")
        xml.close("annotations")
        xml.gen.ignorableWhitespace("\n")
        xml.gen.endDocument()


def _cvat_label(xml: _Xml, name: str, kind: str, attributes: list[str], parent: str | None = None) -> None:
    xml.open("label")
    xml.leaf("name", name)
    xml.leaf("type", kind)
    xml.open("attributes")
    for attribute in attributes:
        xml.open("attribute")
        xml.leaf("name", attribute)
        xml.leaf("mutable", "False")
        xml.leaf("input_type", "text")
        xml.leaf("default_value")
        xml.leaf("values")
        xml.close("attribute")
    xml.close("attributes")
    if parent is not None:
        xml.leaf("parent", parent)
    xml.close("label")


def _cvat_attributes(xml: _Xml, shape: Shape) -> None:
    for name, value in shape.attributes.items():
        xml.leaf("attribute", value, {"name": name})


def _cvat_shape(xml: _Xml, shape: Shape) -> None:
    base = {"label": label_of(shape), "source": "auto"}
    if shape.kind in ("box", "rotated_box"):
        assert shape.box is not None
        tag = "box"
        attrs = (
            base
            | {"occluded": "0"}
            | dict(zip(("xtl", "ytl", "xbr", "ybr"), map(_f2, shape.box), strict=True))
        )
        if shape.rotation % 360:
            attrs["rotation"] = _f2(shape.rotation % 360)
    elif shape.kind == "polygon":
        assert shape.polygon is not None
        tag, attrs = "polygon", base | {"occluded": "0", "points": _cvat_points(shape.polygon)}
    elif shape.kind == "mask":
        assert shape.mask is not None
        if shape.mask.is_empty:  # CVAT cannot hold a mask without pixels
            return
        *runs, xtl, ytl, xbr, ybr = cvat_rle(shape.mask)
        tag = "mask"
        attrs = base | {
            "occluded": "0",
            "rle": ", ".join(map(str, runs)),  # CVAT's exporter writes str(list)[1:-1]
            "left": str(xtl),
            "top": str(ytl),
            "width": str(xbr - xtl + 1),
            "height": str(ybr - ytl + 1),
        }
    else:  # keypoints
        assert shape.keypoints is not None
        xml.open("skeleton", base | {"z_order": "0"})
        for k in shape.keypoints:
            outside = "0" if k.visible else "1"
            point = {"label": k.name, "source": "auto", "outside": outside, "occluded": "0"}
            xml.leaf("points", attrs=point | {"points": _cvat_points([k.x, k.y])})
        _cvat_attributes(xml, shape)
        xml.close("skeleton")
        return
    xml.open(tag, attrs | {"z_order": "0"})
    _cvat_attributes(xml, shape)
    xml.close(tag)


def _cvat_points(flat: list[float]) -> str:
    return ";".join(f"{_f2(x)},{_f2(y)}" for x, y in zip(flat[0::2], flat[1::2], strict=True))


# -- COCO ------------------------------------------------------------------------------------------------


def write_coco(path: Path, info: DetectorInfo, results: Results) -> None:
    """COCO instances JSON in one pass: images go straight to the file, annotations to a side file that is
    appended after them, and categories (all labels seen) come last. Masks are compressed RLE
    (iscrowd 0, exact); polygons and rotated boxes are polygons; boxes have an empty segmentation;
    keypoints use v=2 for visible points and 0, 0, 0 for the others (CVAT's "outside"). Tags are not
    COCO annotations and are left out."""
    table = LabelTable.for_detector(info)
    points: list[str] = list(info.keypoint_names)
    dump = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    with _atomic(path) as out, tempfile.TemporaryFile("w+", encoding="utf-8", dir=path.parent) as side:
        out.write('{"info":{"description":"labelserve pre-labels","version":"1.0"},"licenses":[],"images":[')
        first_image, ann_id = True, 0
        for result in results():
            image = {
                "id": result.index + 1,
                "file_name": result.name,
                "width": result.width,
                "height": result.height,
            }
            out.write(("\n" if first_image else ",\n") + dump(image))
            first_image = False
            for shape in result.shapes:
                if shape.kind == "tag":
                    continue
                if shape.kind == "keypoints" and not points:
                    points = [k.name for k in shape.keypoints or []]
                ann = _coco_annotation(shape, table.see(shape) + 1, result.index + 1, points)
                if ann is None:
                    continue
                ann_id += 1
                side.write(("\n" if ann_id == 1 else ",\n") + dump({"id": ann_id, **ann}))
        out.write('\n],"annotations":[')
        side.seek(0)
        shutil.copyfileobj(side, out)
        out.write('\n],"categories":[')
        categories = []
        for name, class_id in table.ids.items():
            category: dict[str, Any] = {"id": class_id + 1, "name": name, "supercategory": ""}
            if "keypoints" in table.kinds.get(name, ()):
                category["keypoints"] = points
                category["skeleton"] = [[a + 1, b + 1] for a, b in info.skeleton]
            categories.append(dump(category))
        out.write("\n" + ",\n".join(categories) + "\n]}\n")


def _coco_annotation(shape: Shape, category: int, image_id: int, points: list[str]) -> dict[str, Any] | None:
    bounds = shape.bounds()
    if bounds is None:  # an empty mask, or keypoints none of which is visible
        return None
    x1, y1, x2, y2 = bounds
    ann: dict[str, Any] = {
        "image_id": image_id,
        "category_id": category,
        "bbox": [_r(x1), _r(y1), _r(x2 - x1), _r(y2 - y1)],
        "iscrowd": 0,
    }
    if shape.kind == "mask":
        assert shape.mask is not None
        ann["area"] = shape.mask.area()
        ann["segmentation"] = coco_rle(shape.mask)
    elif shape.kind == "polygon":
        assert shape.polygon is not None
        ann["area"] = _r(_polygon_area(shape.polygon))
        ann["segmentation"] = [[_r(v) for v in shape.polygon]]
    elif shape.kind == "rotated_box":
        assert shape.box is not None
        ann["area"] = _r((shape.box[2] - shape.box[0]) * (shape.box[3] - shape.box[1]))
        ann["segmentation"] = [[_r(v) for v in _corners(shape)]]
        ann["attributes"] = {"rotation": _r(shape.rotation % 360)}
    else:
        ann["area"] = _r((x2 - x1) * (y2 - y1))
        ann["segmentation"] = []
    if shape.kind == "keypoints":
        by_name = {k.name: k for k in shape.keypoints or []}
        flat: list[float] = []
        for name in points:
            k = by_name.get(name)
            flat += [_r(k.x), _r(k.y), 2] if k is not None and k.visible else [0, 0, 0]
        ann["keypoints"] = flat
        ann["num_keypoints"] = sum(1 for v in flat[2::3] if v)
    if shape.score is not None:
        ann["score"] = round(float(shape.score), 5)
    if shape.attributes:
        ann.setdefault("attributes", {}).update(shape.attributes)
    return ann


# -- YOLO ------------------------------------------------------------------------------------------------


def write_yolo(directory: Path, info: DetectorInfo, results: Results, polygon_tolerance: float = 1.0) -> None:
    """Ultralytics layout: labels/<name>.txt per image (empty when nothing was found, so the image counts as
    background) and data.yaml with the class names, written last. Coordinates are normalised and clipped to
    0..1. The row follows the shape: box `cls cx cy w h`; rotated box `cls x1 y1 .. x4 y4`; polygon and mask
    (its largest outline) `cls x1 y1 ...`; keypoints `cls cx cy w h kx ky v ...` (box around the visible
    points; v is 2, or 0 0 0 for points that are not visible). To keep every file one kind of dataset, a
    segment model's boxes are written as 4-point polygons, an obb model's as 4 corners, and a pose model
    writes only its keypoints. Tags are not YOLO detection labels and are left out."""
    table = LabelTable.for_detector(info)
    points: list[str] = list(info.keypoint_names)
    labels = directory / YOLO_LABELS
    for result in results():
        rows: list[str] = []
        for shape in result.shapes:
            if shape.kind == "keypoints" and not points:
                points = [k.name for k in shape.keypoints or []]
            row = _yolo_row(shape, info.task, result.width, result.height, points, polygon_tolerance)
            if row is not None:
                rows.append(" ".join([str(table.see(shape)), *row]))
        target = labels / yolo_label_path(result.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _atomic(target, sync=False) as out:  # one fsync per image would dominate the write
            out.write("".join(r + "\n" for r in rows))

    lines = [
        "# labelserve pre-labels (ultralytics YOLO layout)",
        "path: .",
        f"nc: {len(table.names())}",
        "names:",
    ]
    lines += [f"  {i}: {json.dumps(n, ensure_ascii=False)}" for i, n in table.names().items()]
    if info.task == "pose" and points:
        lines.append(f"kpt_shape: [{len(points)}, 3]")
    with _atomic(directory / YOLO_YAML) as out:
        out.write("\n".join(lines) + "\n")


def _yolo_row(
    shape: Shape, task: str, width: int, height: int, points: list[str], tolerance: float
) -> list[str] | None:
    def norm(flat: list[float]) -> list[float]:
        return [min(max(v / (width if i % 2 == 0 else height), 0.0), 1.0) for i, v in enumerate(flat)]

    def xy(flat: list[float]) -> list[str]:
        return [f"{v:.6f}" for v in norm(flat)]

    def box(bounds: tuple[float, float, float, float]) -> list[str]:
        x1, y1, x2, y2 = norm(list(bounds))
        return [f"{v:.6f}" for v in ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)]

    if task == "pose" or shape.kind == "keypoints":
        if task != "pose" or shape.kind != "keypoints":
            return None
        bounds = shape.bounds()
        if bounds is None:
            return None
        by_name = {k.name: k for k in shape.keypoints or []}
        row = box(bounds)
        for name in points:
            k = by_name.get(name)
            row += [*xy([k.x, k.y]), "2"] if k is not None and k.visible else ["0", "0", "0"]
        return row
    if shape.kind == "tag":
        return None
    if shape.kind == "mask":
        assert shape.mask is not None
        outlines = polygons(shape.mask, tolerance)
        return xy(outlines[0]) if outlines else None
    if shape.kind == "polygon":
        assert shape.polygon is not None
        return xy(shape.polygon)
    if shape.kind == "rotated_box" or task in ("segment", "obb"):
        return xy(_corners(shape))
    assert shape.box is not None
    return box(shape.box)
