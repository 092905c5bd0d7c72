"""YOLO txt labels and data.yaml, in the ultralytics layout."""

from __future__ import annotations

import json
from pathlib import Path

from models.detector import DetectorInfo
from models.shapes import Shape, polygons
from server.formats.files import YOLO_LABELS, YOLO_YAML, LabelTable, Results, atomic, corners, yolo_label_path


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
        with atomic(target, sync=False) as out:  # one fsync per image would dominate the write
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
    with atomic(directory / YOLO_YAML) as out:
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
        return xy(corners(shape))
    assert shape.box is not None
    return box(shape.box)
