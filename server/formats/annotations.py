"""Reading annotated datasets back into Shapes: COCO instances JSON, CVAT for images 1.1 XML and the
ultralytics YOLO layout. The review job (server.jobs.review_job) scores these against a detector.

Every shape keeps an id that names it in the source, so a finding can point at it: the COCO annotation id,
the CVAT XML shape's `id` attribute when present (else "<image id>:<n>", its place in the image), and
"<label file>:<line>" for YOLO. YOLO coordinates are relative: the image's size, known only once it is
decoded, turns them into pixels (`AnnotatedImage.in_pixels`).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from models.shapes import Shape
from server.formats.files import YOLO_LABELS, YOLO_YAML, yolo_label_path
from server.formats.rle import coco_rle_decode, cvat_rle_decode
from server.formats.stored import shape_from_dict, shape_to_dict

AnnotationFormat = Literal["coco", "cvat_images", "yolo"]


class AnnotationError(ValueError):
    """The annotations cannot be read; str() says what is wrong and where."""


@dataclass(frozen=True)
class Annotation:
    shape_id: str
    shape: Shape


@dataclass(frozen=True)
class AnnotatedImage:
    name: str  # relative to the images' folder, as a job source names it
    width: int | None  # None for YOLO: its coordinates are relative
    height: int | None
    annotations: list[Annotation] = field(default_factory=list)

    def in_pixels(self, width: int, height: int) -> list[Annotation]:
        """The annotations in pixels of an image of this size (YOLO's relative ones scaled)."""
        if self.width is not None:
            return self.annotations
        return [Annotation(a.shape_id, _scaled(a.shape, width, height)) for a in self.annotations]


def dump_dataset(images: list[AnnotatedImage]) -> bytes:
    """A dataset as compact bytes (zlib JSON, shapes as stored results are), for a job to keep."""
    rows = [
        [
            image.name,
            image.width,
            image.height,
            [[a.shape_id, shape_to_dict(a.shape)] for a in image.annotations],
        ]
        for image in images
    ]
    return zlib.compress(json.dumps(rows, separators=(",", ":")).encode(), 6)


def load_dataset(data: bytes) -> list[AnnotatedImage]:
    """What dump_dataset wrote: the same images, in the same order, with equal shapes."""
    return [
        AnnotatedImage(name, width, height, [Annotation(i, shape_from_dict(d)) for i, d in annotations])
        for name, width, height, annotations in json.loads(zlib.decompress(data))
    ]


def read_annotations(fmt: AnnotationFormat, path: Path) -> list[AnnotatedImage]:
    """The images of a dataset and their shapes, in the dataset's own order. `path` is the COCO JSON file,
    the CVAT XML file, or the YOLO directory (data.yaml, labels/). Raises AnnotationError."""
    try:
        if fmt == "coco":
            return _read_coco(path)
        if fmt == "cvat_images":
            return _read_cvat(path)
        if fmt == "yolo":
            return _read_yolo(path)
    except AnnotationError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, ET.ParseError) as exc:
        raise AnnotationError(f"{path}: {exc.__class__.__name__}: {exc}") from None
    raise AnnotationError(f"unknown annotation format {fmt!r}")


def _read_coco(path: Path) -> list[AnnotatedImage]:
    data = json.loads(path.read_text(encoding="utf-8"))
    categories = {c["id"]: str(c["name"]) for c in data.get("categories", [])}
    by_image: dict[Any, list[Annotation]] = {}
    for ann in data.get("annotations", []):
        label = categories.get(ann["category_id"])
        if label is None:
            raise AnnotationError(f"annotation {ann.get('id')} has category {ann['category_id']}, not listed")
        shape = _coco_shape(ann, label)
        if shape is not None:
            by_image.setdefault(ann["image_id"], []).append(Annotation(str(ann["id"]), shape))
    known = {image["id"] for image in data.get("images", [])}
    stray = sorted(set(by_image) - known, key=str)
    if stray:
        raise AnnotationError(f"annotations refer to image ids {stray[:5]} that 'images' does not list")
    return [
        AnnotatedImage(
            str(image["file_name"]), int(image["width"]), int(image["height"]), by_image.get(image["id"], [])
        )
        for image in data.get("images", [])
    ]


def _coco_shape(ann: dict[str, Any], label: str) -> Shape | None:
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, list) and segmentation and len(segmentation[0]) >= 6:
        # Several parts: the largest stands for the object (the review compares one outline per shape).
        part = max(segmentation, key=len)
        return Shape("polygon", label=label, polygon=[float(v) for v in part])
    if isinstance(segmentation, dict) and segmentation.get("counts") is not None:
        return Shape("mask", label=label, mask=coco_rle_decode(segmentation))
    x, y, w, h = (float(v) for v in ann["bbox"])
    if w <= 0 or h <= 0:
        return None
    return Shape("box", label=label, box=(x, y, x + w, y + h))


def _read_cvat(path: Path) -> list[AnnotatedImage]:
    root = ET.parse(path).getroot()
    images = []
    for image in root.iter("image"):
        a = image.attrib
        width, height = int(a["width"]), int(a["height"])
        found = []
        for n, element in enumerate(e for e in image if e.tag in ("box", "polygon", "mask")):
            shape = _cvat_shape(element, width, height)
            shape_id = element.attrib.get("id") or f"{a.get('id', a['name'])}:{n}"
            found.append(Annotation(shape_id, shape))
        images.append(AnnotatedImage(a["name"], width, height, found))
    return images


def _cvat_shape(element: ET.Element, width: int, height: int) -> Shape:
    a, label = element.attrib, element.attrib["label"]
    if element.tag == "box":
        box = tuple(float(a[k]) for k in ("xtl", "ytl", "xbr", "ybr"))
        return Shape("box", label=label, box=box)  # type: ignore[arg-type]
    if element.tag == "polygon":
        flat = [float(v) for pair in a["points"].split(";") for v in pair.split(",")]
        return Shape("polygon", label=label, polygon=flat)
    left, top, w, h = (int(float(a[k])) for k in ("left", "top", "width", "height"))
    runs = [int(v) for v in a["rle"].split(",")]
    # cvat_rle_decode reads the detector layout: runs, then the inclusive box.
    return Shape(
        "mask",
        label=label,
        mask=cvat_rle_decode([*runs, left, top, left + w - 1, top + h - 1], width, height),
    )


def _read_yolo(directory: Path) -> list[AnnotatedImage]:
    names = _yolo_names(directory / YOLO_YAML)
    labels = directory / YOLO_LABELS
    images = []
    for txt in sorted(labels.rglob("*.txt")):
        rel = txt.relative_to(labels).as_posix()
        found = []
        for line_no, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), start=1):
            values = line.split()
            if not values:
                continue
            class_id = int(values[0])
            if class_id not in names:
                raise AnnotationError(f"{txt}:{line_no}: class {class_id} is not in {YOLO_YAML}'s names")
            coords = [float(v) for v in values[1:]]
            found.append(Annotation(f"{rel}:{line_no}", _yolo_shape(names[class_id], coords, txt, line_no)))
        images.append(AnnotatedImage(rel, None, None, found))  # name: the label file's, matched by stem
    return images


def _yolo_shape(label: str, coords: list[float], txt: Path, line_no: int) -> Shape:
    if len(coords) == 4:
        cx, cy, w, h = coords
        return Shape("box", label=label, box=(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    if len(coords) >= 6 and len(coords) % 2 == 0:
        return Shape("polygon", label=label, polygon=coords)
    raise AnnotationError(f"{txt}:{line_no}: expected 4 box values or a polygon, got {len(coords)} numbers")


def _yolo_names(path: Path) -> dict[int, str]:
    import yaml  # pinned; only YOLO datasets need it

    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    names = data.get("names")
    if isinstance(names, list):
        return dict(enumerate(str(n) for n in names))
    if isinstance(names, dict):
        return {int(k): str(v) for k, v in names.items()}
    raise AnnotationError(f"{path} has no 'names'")


def yolo_matches(label_file: str, image_name: str) -> bool:
    """Is `label_file` (labels/-relative) the YOLO label file of the image `image_name`?"""
    return label_file == yolo_label_path(PurePosixPath(image_name).as_posix())


def _scaled(shape: Shape, width: int, height: int) -> Shape:
    if shape.box is not None:
        x1, y1, x2, y2 = shape.box
        return replace(shape, box=(x1 * width, y1 * height, x2 * width, y2 * height))
    assert shape.polygon is not None
    return replace(
        shape, polygon=[v * (width if i % 2 == 0 else height) for i, v in enumerate(shape.polygon)]
    )
