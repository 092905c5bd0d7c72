"""Internal shapes → the JSON CVAT's Nuclio protocol expects (../shared/docs/cvat-protocols.md §A.5, §C).

Every CVAT rendering lives here; the RLE and bitmap rules themselves live in server.masks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from server.masks import RegionMask, cvat_detector_mask, cvat_rle, polygons
from server.shapes import Shape

CONFIDENCE_SPEC_ID = 0  # CVAT's InteractionResultAttributes.CONFIDENCE


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
