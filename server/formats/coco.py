"""COCO instances JSON, written in one pass however many images a job has."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from models.detector import DetectorInfo
from models.shapes import Shape, polygon_area
from server.formats.files import LabelTable, Results, atomic, corners, r2
from server.formats.rle import coco_rle


def write_coco(path: Path, info: DetectorInfo, results: Results) -> None:
    """COCO instances JSON in one pass: images go straight to the file, annotations to a side file that is
    appended after them, and categories (all labels seen) come last. Masks are compressed RLE
    (iscrowd 0, exact); polygons and rotated boxes are polygons; boxes have an empty segmentation;
    keypoints use v=2 for visible points and 0, 0, 0 for the others (CVAT's "outside"). Tags are not
    COCO annotations and are left out."""
    table = LabelTable.for_detector(info)
    points: list[str] = list(info.keypoint_names)
    dump = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    with atomic(path) as out, tempfile.TemporaryFile("w+", encoding="utf-8", dir=path.parent) as side:
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
        "bbox": [r2(x1), r2(y1), r2(x2 - x1), r2(y2 - y1)],
        "iscrowd": 0,
    }
    if shape.kind == "mask":
        assert shape.mask is not None
        ann["area"] = shape.mask.area()
        ann["segmentation"] = coco_rle(shape.mask)
    elif shape.kind == "polygon":
        assert shape.polygon is not None
        ann["area"] = r2(polygon_area(shape.polygon))
        ann["segmentation"] = [[r2(v) for v in shape.polygon]]
    elif shape.kind == "rotated_box":
        assert shape.box is not None
        ann["area"] = r2((shape.box[2] - shape.box[0]) * (shape.box[3] - shape.box[1]))
        ann["segmentation"] = [[r2(v) for v in corners(shape)]]
        ann["attributes"] = {"rotation": r2(shape.rotation % 360)}
    else:
        ann["area"] = r2((x2 - x1) * (y2 - y1))
        ann["segmentation"] = []
    if shape.kind == "keypoints":
        by_name = {k.name: k for k in shape.keypoints or []}
        flat: list[float] = []
        for name in points:
            k = by_name.get(name)
            flat += [r2(k.x), r2(k.y), 2] if k is not None and k.visible else [0, 0, 0]
        ann["keypoints"] = flat
        ann["num_keypoints"] = sum(1 for v in flat[2::3] if v)
    if shape.score is not None:
        ann["score"] = round(float(shape.score), 5)
    if shape.attributes:
        ann.setdefault("attributes", {}).update(shape.attributes)
    return ann
