"""Shapes ↔ JSON-able dicts, for storing results. Lossless: `shape_from_dict(shape_to_dict(s)) == s`.

Masks are stored as CVAT RLE over their tight inclusive box plus the image size, so a stored mask costs what
its outline costs, not what the image costs; decoding gives the same full-image mask.
"""

from __future__ import annotations

from typing import Any

from models.shapes import Keypoint, RegionMask, Shape
from server.formats.rle import cvat_rle, cvat_rle_decode


def shape_to_dict(shape: Shape) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": shape.kind}
    if shape.label is not None:
        out["label"] = shape.label
    if shape.score is not None:
        out["score"] = float(shape.score)
    if shape.box is not None:
        out["box"] = [_num(v) for v in shape.box]
    if shape.rotation:
        out["rotation"] = float(shape.rotation)
    if shape.polygon is not None:
        out["polygon"] = [_num(v) for v in shape.polygon]
    if shape.mask is not None:
        out["mask"] = mask_to_dict(shape.mask)
    if shape.keypoints is not None:
        out["keypoints"] = [_keypoint_to_dict(k) for k in shape.keypoints]
    if shape.attributes:
        out["attributes"] = dict(shape.attributes)
    return out


def shape_from_dict(data: dict[str, Any]) -> Shape:
    box = data.get("box")
    keypoints = data.get("keypoints")
    return Shape(
        kind=data["kind"],
        label=data.get("label"),
        score=data.get("score"),
        box=tuple(box) if box is not None else None,  # type: ignore[arg-type]
        rotation=data.get("rotation", 0.0),
        polygon=data.get("polygon"),
        mask=mask_from_dict(data["mask"]) if "mask" in data else None,
        keypoints=[_keypoint_from_dict(k) for k in keypoints] if keypoints is not None else None,
        attributes=dict(data.get("attributes", {})),
    )


def mask_to_dict(mask: RegionMask) -> dict[str, Any]:
    return {"cvat": cvat_rle(mask), "width": mask.image_width, "height": mask.image_height}


def mask_from_dict(data: dict[str, Any]) -> RegionMask:
    return cvat_rle_decode(data["cvat"], data["width"], data["height"])


def _keypoint_to_dict(k: Keypoint) -> dict[str, Any]:
    out: dict[str, Any] = {"name": k.name, "x": _num(k.x), "y": _num(k.y), "visible": bool(k.visible)}
    if k.score is not None:
        out["score"] = float(k.score)
    return out


def _keypoint_from_dict(data: dict[str, Any]) -> Keypoint:
    return Keypoint(data["name"], data["x"], data["y"], data.get("visible", True), data.get("score"))


def _num(value: Any) -> int | float:
    """Plain Python numbers (detectors hand numpy scalars), keeping ints as ints so equality holds."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    as_float = float(value)
    return int(value) if hasattr(value, "dtype") and value.dtype.kind in "iu" else as_float
