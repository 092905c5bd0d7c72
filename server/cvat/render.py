"""Internal shapes → the JSON CVAT's Nuclio protocol expects (../shared/docs/cvat-protocols.md §A.5, §C).

Every CVAT rendering lives here; the RLE and bitmap rules themselves live in server.masks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.detector import DetectorInfo
from server.masks import RegionMask, cvat_detector_mask, cvat_rle, polygons
from server.shapes import Shape

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
