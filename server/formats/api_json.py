"""labelserve's own JSON for shapes and masks (models.shapes), masks in the encodings a request asks for."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from models.shapes import RegionMask, Shape, polygons
from server.formats.rle import coco_rle, cvat_rle

__all__ = ["MASK_FORMATS", "render_mask", "render_shape"]

# Mask encodings render_mask can produce; "bbox" and "area" are always included.
MASK_FORMATS: tuple[str, ...] = ("cvat", "coco_rle", "polygons")


def render_mask(mask: RegionMask, formats: Collection[str], polygon_tolerance: float = 1.0) -> dict[str, Any]:
    """Encode ``mask`` in each requested format (see MASK_FORMATS), plus ``bbox`` and ``area``.

    * ``"cvat"``: CVAT mask points, RLE + inclusive ``xtl, ytl, xbr, ybr`` (rle.cvat_rle)
    * ``"coco_rle"``: ``{"size": [h, w], "counts": str}`` (rle.coco_rle)
    * ``"polygons"``: list of flat polygons, largest first (models.shapes.polygons with ``polygon_tolerance``)
    * always ``"bbox"``: ``[x, y, w, h]`` (COCO style) and ``"area"``: foreground pixel count.

    A bare string is taken as a single format name.
    """
    names = [formats] if isinstance(formats, str) else list(formats)
    unknown = sorted({n for n in names if n not in MASK_FORMATS}, key=str)
    if unknown:
        bad = ", ".join(map(repr, unknown))
        raise ValueError(f"unknown mask format(s) {bad}; valid formats: {', '.join(MASK_FORMATS)}")
    tight = mask.tight()  # crop once; every encoder would otherwise redo it
    out: dict[str, Any] = {"bbox": tight.bbox_xywh(), "area": tight.area()}
    if "cvat" in names:
        out["cvat"] = cvat_rle(tight)
    if "coco_rle" in names:
        out["coco_rle"] = coco_rle(tight)
    if "polygons" in names:
        out["polygons"] = polygons(tight, polygon_tolerance)
    return out


def render_shape(
    shape: Shape, mask_formats: Collection[str], polygon_tolerance: float = 1.0
) -> dict[str, Any]:
    """labelserve's own JSON for a shape: every field of the internal model, masks in the asked encodings."""
    out: dict[str, Any] = {"kind": shape.kind, "label": shape.label, "score": shape.score}
    if shape.box is not None:
        out["box"] = [float(v) for v in shape.box]
    if shape.kind == "rotated_box":
        out["rotation"] = float(shape.rotation)
    if shape.polygon is not None:
        out["polygon"] = [float(v) for v in shape.polygon]
    if shape.mask is not None:
        out["mask"] = render_mask(shape.mask, mask_formats, polygon_tolerance)
    if shape.keypoints is not None:
        out["keypoints"] = [
            {"name": kp.name, "x": float(kp.x), "y": float(kp.y), "visible": kp.visible, "score": kp.score}
            for kp in shape.keypoints
        ]
    if shape.attributes:
        out["attributes"] = dict(shape.attributes)
    return out
