"""Internal shapes → the JSON CVAT's Nuclio protocol expects (../shared/docs/cvat-protocols.md §A.5, §C).

Every CVAT JSON rendering lives here; the RLE and bitmap rules themselves live in server.formats.rle.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.detector import DetectorInfo
from models.shapes import RegionMask, Shape, polygon_area, polygons
from server.formats.rle import cvat_detector_mask, cvat_rle, cvat_rle_decode

CONFIDENCE_SPEC_ID = 0  # CVAT's InteractionResultAttributes.CONFIDENCE

# The CVAT label type each Ultralytics task produces (CVAT maps mask labels onto polygon labels too).
LABEL_TYPES = {
    "detect": "rectangle",
    "obb": "rectangle",
    "segment": "mask",
    "pose": "skeleton",
    "classify": "tag",
}


def confidence(score: float) -> str:
    """CVAT's confidence attribute: a float string within 0..1 (SAM's predicted IoU can stray outside)."""
    return f"{min(max(score, 0.0), 1.0):.4f}"


def interactor_reply(masks: list[tuple[RegionMask, float]]) -> dict[str, Any]:
    """CVAT ≥ 2.60 interactor reply: mask shapes as RLE + inclusive bbox, with a confidence attribute."""
    return {
        "shapes": [
            {
                "type": "mask",
                "points": cvat_rle(mask),
                "attributes": [{"spec_id": CONFIDENCE_SPEC_ID, "value": confidence(score)}],
            }
            for mask, score in masks
            if not mask.is_empty  # the UI cannot show an empty mask
        ]
    }


def legacy_interactor_reply(mask: RegionMask) -> dict[str, Any]:
    """CVAT < 2.60: {"mask": H×W} of 0/255, which cvat-core RLE-encodes over the full image."""
    return {"mask": (mask.to_full().astype(np.uint8) * 255).tolist()}


def detector_item(shape: Shape, polygon_tolerance: float = 1.0) -> dict[str, Any]:
    """One element of a Nuclio detector reply. Masks carry both the bbox bitmap and a polygon, so CVAT's
    `conv_mask_to_poly` works; confidence is informational (CVAT stores none)."""
    item: dict[str, Any] = {"label": shape.label}
    if shape.score is not None:
        item["confidence"] = f"{shape.score:.4f}"
    if shape.attributes:
        item["attributes"] = [{"name": k, "value": v} for k, v in shape.attributes.items()]
    if shape.kind in ("box", "rotated_box"):
        assert shape.box is not None
        item.update(type="rectangle", points=[float(v) for v in shape.box])
        if shape.kind == "rotated_box":
            item["rotation"] = float(shape.rotation) % 360.0
    elif shape.kind == "polygon":
        assert shape.polygon is not None
        item.update(type="polygon", points=[float(v) for v in shape.polygon])
    elif shape.kind == "mask":
        assert shape.mask is not None
        outline = polygons(shape.mask, polygon_tolerance)
        item.update(type="mask", mask=cvat_detector_mask(shape.mask))
        if outline:  # a speck with no polygon stays a mask even under conv_mask_to_poly
            item["points"] = outline[0]
    elif shape.kind == "keypoints":
        assert shape.keypoints is not None
        item.update(
            type="skeleton",
            elements=[
                {
                    "label": kp.name,
                    "type": "points",
                    "points": [float(kp.x), float(kp.y)],
                    "outside": not kp.visible,
                }
                for kp in shape.keypoints
            ],
        )
    else:
        item["type"] = "tag"
    return item


def label_spec(info: DetectorInfo) -> list[dict[str, Any]]:
    """The `spec` annotation of a Nuclio detector: one label per class, skeletons with sublabels and svg."""
    label_type = LABEL_TYPES[info.task]
    labels = []
    for class_id, name in sorted(info.class_names.items()):
        label: dict[str, Any] = {"id": class_id, "name": name, "type": label_type}
        if label_type == "skeleton":
            label["sublabels"] = [
                {"id": i, "name": point, "type": "points"} for i, point in enumerate(info.keypoint_names)
            ]
            label["svg"] = skeleton_svg(info)
        labels.append(label)
    return labels


def skeleton_svg(info: DetectorInfo) -> str:
    """CVAT's skeleton template: nodes on a circle in a 100×100 box, edges between them (ids are 1-based)."""
    count = max(len(info.keypoint_names), 1)
    nodes = {
        i + 1: (50 + 40 * np.cos(2 * np.pi * i / count), 50 + 40 * np.sin(2 * np.pi * i / count))
        for i in range(count)
    }
    edges = "".join(
        f'<line x1="{nodes[a + 1][0]:.1f}" y1="{nodes[a + 1][1]:.1f}" x2="{nodes[b + 1][0]:.1f}" '
        f'y2="{nodes[b + 1][1]:.1f}" data-type="edge" data-node-from="{a + 1}" data-node-to="{b + 1}"></line>'
        for a, b in info.skeleton
    )
    circles = "".join(
        f'<circle r="0.75" cx="{x:.1f}" cy="{y:.1f}" data-type="element node" data-element-id="{i}" '
        f'data-node-id="{i}" data-label-name="{name}"></circle>'
        for (i, (x, y)), name in zip(nodes.items(), info.keypoint_names, strict=False)
    )
    return edges + circles


# ---- trackers: CVAT's trackable shapes {"type", "points"} ⇄ internal shapes --------------------------------
TRACKABLE_TYPES = ("rectangle", "polygon", "mask")
_KIND_OF = {"rectangle": "box", "polygon": "polygon", "mask": "mask"}


def trackable_to_shape(item: dict[str, Any], width: int, height: int) -> Shape:
    """A CVAT trackable shape (rectangle x1,y1,x2,y2; polygon x,y,...; mask RLE + inclusive bbox) → Shape.
    Raises ValueError with a message for the caller."""
    kind = item.get("type")
    points = item.get("points")
    if kind not in TRACKABLE_TYPES:
        raise ValueError(f"shape type {kind!r} cannot be tracked; use one of {', '.join(TRACKABLE_TYPES)}")
    if not isinstance(points, list) or not all(isinstance(v, int | float) for v in points):
        raise ValueError(f"a {kind} shape needs 'points', a flat list of numbers")
    if kind == "rectangle":
        if len(points) != 4:
            raise ValueError("a rectangle's points are [x1, y1, x2, y2]")
        x1, y1, x2, y2 = (float(v) for v in points)
        return Shape("box", box=(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))
    if kind == "polygon":
        return Shape("polygon", polygon=[float(v) for v in points])
    return Shape("mask", mask=cvat_rle_decode(points, width, height))


def shape_to_trackable(shape: Shape, as_type: str, polygon_tolerance: float = 1.0) -> dict[str, Any] | None:
    """A tracker's result as the CVAT type the object was given as (CVAT requires the same type back);
    None when nothing is left to draw."""
    if shape.kind == "mask" and shape.mask is not None:
        mask = shape.mask
        if mask.is_empty:
            return None
        if as_type == "mask":
            return {"type": "mask", "points": cvat_rle(mask)}
        if as_type == "polygon":
            pieces = polygons(mask, polygon_tolerance)
            if not pieces:
                return None
            return {"type": "polygon", "points": max(pieces, key=polygon_area)}
        x1, y1, x2, y2 = mask.bbox_xyxy_inclusive()  # type: ignore[misc]
        return {"type": "rectangle", "points": [float(x1), float(y1), float(x2 + 1), float(y2 + 1)]}
    if shape.kind == "box" and shape.box is not None:
        if as_type != "rectangle":
            raise ValueError(f"this tracker returns rectangles, not {as_type}s")
        return {"type": "rectangle", "points": [round(v, 2) for v in shape.box]}
    raise ValueError(f"a {shape.kind} result cannot be sent to CVAT as a {as_type}")
