"""The one internal shape model every output format (CVAT, COCO, YOLO, ...) serialises from.

Coordinates are full-image *pixel-edge* coordinates (a full image box is ``[0, 0, W, H]``), as in CVAT.
Masks are :class:`server.masks.RegionMask`; their encodings live in :mod:`server.masks`.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal

from server.masks import RegionMask, coco_rle, cvat_rle, polygons

__all__ = ["MASK_FORMATS", "Keypoint", "Shape", "ShapeKind", "render_mask", "render_shape"]

ShapeKind = Literal["box", "rotated_box", "polygon", "mask", "keypoints", "tag"]
_KINDS: tuple[str, ...] = ("box", "rotated_box", "polygon", "mask", "keypoints", "tag")

# Mask encodings render_mask can produce; "bbox" and "area" are always included.
MASK_FORMATS: tuple[str, ...] = ("cvat", "coco_rle", "polygons")


@dataclass(frozen=True)
class Keypoint:
    """One named point (pixel-edge coordinates). ``visible=False`` means labelled but occluded/outside."""

    name: str
    x: float
    y: float
    visible: bool = True
    score: float | None = None


@dataclass(frozen=True)
class Shape:
    """A labelled geometric result. Exactly the geometry field for ``kind`` is set:

    * ``box`` / ``rotated_box``: ``box = (x1, y1, x2, y2)``; ``rotation`` in degrees about the box centre
      (CVAT convention), only for ``rotated_box``.
    * ``polygon``: flat ``[x0, y0, x1, y1, ...]``, at least 3 points.
    * ``mask``: a RegionMask.
    * ``keypoints``: a list of Keypoint.
    * ``tag``: no geometry (whole-image label).
    """

    kind: ShapeKind
    label: str | None = None
    score: float | None = None
    box: tuple[float, float, float, float] | None = None
    rotation: float = 0.0
    polygon: list[float] | None = None
    mask: RegionMask | None = None
    keypoints: list[Keypoint] | None = None
    attributes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown shape kind {self.kind!r}; valid kinds: {', '.join(_KINDS)}")
        if self.score is not None and not math.isfinite(self.score):
            raise ValueError(f"score must be a finite number, got {self.score!r}")
        if not math.isfinite(self.rotation):
            raise ValueError(f"rotation must be a finite number of degrees, got {self.rotation!r}")
        if self.rotation and self.kind != "rotated_box":
            raise ValueError(f"rotation is only meaningful for rotated_box, not {self.kind}")

        geometry = {
            "box": self.box,
            "polygon": self.polygon,
            "mask": self.mask,
            "keypoints": self.keypoints,
        }
        wanted = {"box": "box", "rotated_box": "box"}.get(self.kind, self.kind)
        for name, value in geometry.items():
            if (value is not None) != (name == wanted):
                expected = f"only {wanted!r}" if wanted in geometry else "no geometry"
                got = "missing" if value is None else "set"
                raise ValueError(f"a {self.kind} shape takes {expected}; {name} is {got}")

        if self.box is not None:
            if len(self.box) != 4 or not all(math.isfinite(v) for v in self.box):
                raise ValueError(f"box must be 4 finite numbers (x1, y1, x2, y2), got {self.box!r}")
            x1, y1, x2, y2 = self.box
            if x2 < x1 or y2 < y1:
                raise ValueError(f"box must have x1 <= x2 and y1 <= y2, got {self.box!r}")
        if self.polygon is not None and (len(self.polygon) < 6 or len(self.polygon) % 2):
            raise ValueError(f"polygon needs an even number (>= 6) of coordinates, got {len(self.polygon)}")
        for key, value in self.attributes.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError(f"attribute names and values must be strings, got {key!r}: {value!r}")

    def bounds(self) -> tuple[float, float, float, float] | None:
        """Axis-aligned ``(x1, y1, x2, y2)`` in pixel-edge coordinates; None for tags and empty geometry.

        Masks give the outer pixel edges of their pixels; keypoints only count visible points.
        """
        if self.box is not None:
            x1, y1, x2, y2 = self.box
            if self.kind == "rotated_box" and self.rotation % 180:
                # AABB of a rectangle rotated about its centre; symmetric in the rotation direction.
                t = math.radians(self.rotation)
                cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
                ex = abs(hw * math.cos(t)) + abs(hh * math.sin(t))
                ey = abs(hw * math.sin(t)) + abs(hh * math.cos(t))
                return cx - ex, cy - ey, cx + ex, cy + ey
            return x1, y1, x2, y2
        if self.polygon is not None:
            xs, ys = self.polygon[0::2], self.polygon[1::2]
            return min(xs), min(ys), max(xs), max(ys)
        if self.mask is not None:
            bb = self.mask.bbox_xyxy_inclusive()
            return None if bb is None else (bb[0], bb[1], bb[2] + 1, bb[3] + 1)
        if self.keypoints:
            vis = [k for k in self.keypoints if k.visible]
            if not vis:
                return None
            return min(k.x for k in vis), min(k.y for k in vis), max(k.x for k in vis), max(k.y for k in vis)
        return None


def render_mask(mask: RegionMask, formats: Collection[str], polygon_tolerance: float = 1.0) -> dict[str, Any]:
    """Encode ``mask`` in each requested format (see MASK_FORMATS), plus ``bbox`` and ``area``.

    * ``"cvat"``: CVAT mask points, RLE + inclusive ``xtl, ytl, xbr, ybr`` (masks.cvat_rle)
    * ``"coco_rle"``: ``{"size": [h, w], "counts": str}`` (masks.coco_rle)
    * ``"polygons"``: list of flat polygons, largest first (masks.polygons with ``polygon_tolerance``)
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
