"""The shape vocabulary every layer speaks: Shape, Keypoint, and the binary RegionMask, with polygon <-> mask.

Coordinates are full-image *pixel-edge* coordinates (a full image box is ``[0, 0, W, H]``), as in CVAT.
Every output format (CVAT, COCO, YOLO, ...) serialises from these types; their encodings live in
:mod:`server.formats`, never here.

Coordinate conventions (see docs "C. Shapes CVAT accepts"):

* Pixel ``(x, y)`` is column ``x``, row ``y``; in *pixel-edge* coordinates it covers the square
  ``[x, x+1) x [y, y+1)``, so a full image box is ``[0, 0, W, H]``.
* CVAT mask boxes are *inclusive* integer pixel indices ``xtl, ytl, xbr, ybr``.
* Polygon vertices are *pixel centres* expressed in pixel-edge coordinates, i.e. ``(x + 0.5, y + 0.5)``
  for pixel ``(x, y)`` (see :func:`polygons` for why).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np

__all__ = [
    "MAX_IMAGE_PIXELS",
    "Keypoint",
    "RegionMask",
    "Shape",
    "ShapeKind",
    "check_image_size",
    "mask_from_polygon",
    "polygon_area",
    "polygons",
]

ShapeKind = Literal["box", "rotated_box", "polygon", "mask", "keypoints", "tag"]
_KINDS: tuple[str, ...] = ("box", "rotated_box", "polygon", "mask", "keypoints", "tag")


# Decoders allocate memory proportional to the image/region size taken from untrusted input; refuse
# anything larger than any image we would ever serve (200 MP) instead of letting the process be OOM-killed.
MAX_IMAGE_PIXELS = 200_000_000

# Largest polygon coordinate accepted by mask_from_polygon: cv2.fillPoly works on int32 with 8 fractional
# bits, so keep far away from overflow.
_MAX_POLY_COORD = float(1 << 22)
_FILL_SHIFT = 8


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


def polygon_area(flat: Sequence[float]) -> float:
    """The area of a flat ``[x0, y0, x1, y1, ...]`` polygon (the shoelace formula)."""
    xs, ys = flat[0::2], flat[1::2]
    n = len(xs)
    return abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))) / 2


# -- masks ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RegionMask:
    """A full-image binary mask stored as a bitmap over a rectangular region.

    ``bitmap`` (h x w, bool) covers full-image pixels ``[x0, x0+w) x [y0, y0+h)``; every pixel outside the
    region is False. The SAM pipeline only computes a region of interest at full resolution, so codecs work
    on the region and never materialise the full image unless the output format demands it.

    The bitmap is stored as a read-only view without copying; do not mutate the array you passed in.
    Equality is semantic: two masks are equal when they describe the same full-image mask.
    """

    bitmap: np.ndarray
    x0: int
    y0: int
    image_width: int
    image_height: int

    def __post_init__(self) -> None:
        bm = self.bitmap
        if not isinstance(bm, np.ndarray) or bm.ndim != 2 or bm.dtype != np.bool_:
            raise ValueError("RegionMask.bitmap must be a 2-D numpy array of dtype bool")
        for name in ("x0", "y0", "image_width", "image_height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ValueError(f"RegionMask.{name} must be an int, got {value!r}")
            object.__setattr__(self, name, int(value))
        h, w = bm.shape
        if self.image_width < 0 or self.image_height < 0:
            raise ValueError(f"image size must be non-negative, got {self.image_width}x{self.image_height}")
        fits = (
            min(self.x0, self.y0) >= 0
            and self.x0 + w <= self.image_width
            and self.y0 + h <= self.image_height
        )
        if h and w and not fits:
            raise ValueError(
                f"region {w}x{h} at ({self.x0}, {self.y0}) does not fit in image "
                f"{self.image_width}x{self.image_height}"
            )
        view = bm.view()
        view.flags.writeable = False
        object.__setattr__(self, "bitmap", view)

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_full(cls, mask: np.ndarray) -> RegionMask:
        """Wrap a full-image H x W mask (bool, or any numeric dtype where non-zero is foreground)."""
        arr = np.asarray(mask)
        if arr.ndim != 2:
            raise ValueError(f"mask must be 2-D (H x W), got shape {arr.shape}")
        if arr.dtype != np.bool_:
            arr = arr != 0
        return cls(arr, 0, 0, arr.shape[1], arr.shape[0])

    @classmethod
    def empty(cls, image_width: int, image_height: int) -> RegionMask:
        return cls(np.zeros((0, 0), dtype=bool), 0, 0, image_width, image_height)

    # -- queries --------------------------------------------------------------------------------------

    @property
    def is_empty(self) -> bool:
        return self.bitmap.size == 0 or not self.bitmap.any()

    def area(self) -> int:
        return int(np.count_nonzero(self.bitmap))

    def bbox_xyxy_inclusive(self) -> tuple[int, int, int, int] | None:
        """``(xtl, ytl, xbr, ybr)`` of the True pixels, inclusive, full-image coordinates; None if empty."""
        local = _local_bbox(self.bitmap)
        if local is None:
            return None
        r0, r1, c0, c1 = local
        return self.x0 + c0, self.y0 + r0, self.x0 + c1, self.y0 + r1

    def bbox_xywh(self) -> list[int]:
        """COCO-style ``[x, y, w, h]`` in pixels (w, h are pixel counts); ``[0, 0, 0, 0]`` when empty."""
        bb = self.bbox_xyxy_inclusive()
        if bb is None:
            return [0, 0, 0, 0]
        xtl, ytl, xbr, ybr = bb
        return [xtl, ytl, xbr - xtl + 1, ybr - ytl + 1]

    def tight(self) -> RegionMask:
        """The same mask cropped to the bounding box of its True pixels (a 0x0 bitmap when empty)."""
        local = _local_bbox(self.bitmap)
        if local is None:
            return RegionMask.empty(self.image_width, self.image_height)
        r0, r1, c0, c1 = local
        if r0 == 0 and c0 == 0 and r1 == self.bitmap.shape[0] - 1 and c1 == self.bitmap.shape[1] - 1:
            return self
        return RegionMask(
            self.bitmap[r0 : r1 + 1, c0 : c1 + 1],
            self.x0 + c0,
            self.y0 + r0,
            self.image_width,
            self.image_height,
        )

    def to_full(self) -> np.ndarray:
        """Materialise the H x W bool mask (a new, writable array)."""
        full = np.zeros((self.image_height, self.image_width), dtype=bool)
        h, w = self.bitmap.shape
        if h and w:
            full[self.y0 : self.y0 + h, self.x0 : self.x0 + w] = self.bitmap
        return full

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RegionMask):
            return NotImplemented
        if (self.image_width, self.image_height) != (other.image_width, other.image_height):
            return False
        a, b = self.tight(), other.tight()
        return (a.x0, a.y0) == (b.x0, b.y0) and np.array_equal(a.bitmap, b.bitmap)

    __hash__ = None  # type: ignore[assignment]  # holds an ndarray; semantic equality only

    def __repr__(self) -> str:
        h, w = self.bitmap.shape
        return (
            f"RegionMask({w}x{h} at ({self.x0}, {self.y0}) in {self.image_width}x{self.image_height}, "
            f"area={self.area()})"
        )


def _local_bbox(bitmap: np.ndarray) -> tuple[int, int, int, int] | None:
    """(r0, r1, c0, c1) inclusive bounds of True pixels in ``bitmap``, or None."""
    if bitmap.size == 0:
        return None
    rows = np.flatnonzero(bitmap.any(axis=1))
    if rows.size == 0:
        return None
    r0, r1 = int(rows[0]), int(rows[-1])
    # Column reduction only over the occupied rows: the row pass is the cheap one.
    cols = np.flatnonzero(bitmap[r0 : r1 + 1].any(axis=0))
    return r0, r1, int(cols[0]), int(cols[-1])


def check_image_size(width: Any, height: Any) -> tuple[int, int]:
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v <= 0:
            raise ValueError(f"image {name} must be a positive integer, got {v!r}")
    if int(width) * int(height) > MAX_IMAGE_PIXELS:
        raise ValueError(f"image size {width}x{height} exceeds the limit of {MAX_IMAGE_PIXELS} pixels")
    return int(width), int(height)


# -- polygons --------------------------------------------------------------------------------------------


def polygons(mask: RegionMask, tolerance: float = 1.0) -> list[list[float]]:
    """Outer contours as flat ``[x0, y0, x1, y1, ...]`` lists in full-image pixel-edge coordinates.

    Vertices are the centres of boundary pixels, ``(x + 0.5, y + 0.5)``: this is what OpenCV traces and
    what ``cv2.fillPoly`` (closed, boundary-inclusive rasterisation) inverts exactly, so
    ``mask_from_polygon(polygons(m, 0)[0]) == m`` for a single hole-free component. The +0.5 places the
    outline symmetrically half a pixel inside the mask edge in CVAT's pixel-edge system (the detectron2
    convention). Rasterisers that need the pixel centre strictly inside (pycocotools ``frPyObjects``,
    used by COCO tools) lose about half the boundary ring of pixels (IoU ~0.99 for a radius-90 disc,
    ~0.85 for radius 6).

    ``tolerance`` > 0 simplifies with ``cv2.approxPolyDP`` (max deviation in pixels); 0 keeps every
    direction change. Holes are not represented (RETR_EXTERNAL). Pieces with fewer than 3 vertices
    (1-pixel specks, straight 1-pixel lines) are dropped. Sorted by polygon area, largest first.
    """
    if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"polygon tolerance must be a finite number >= 0 pixels, got {tolerance!r}")
    t = mask.tight()
    if t.bitmap.size == 0:
        return []
    h, w = t.bitmap.shape
    # 1-px zero border so contours never touch the array edge.
    padded = np.zeros((h + 2, w + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = t.bitmap
    contours, _ = cv2.findContours(padded, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    # Undo the padding and move to pixel-centre, full-image coordinates.
    offset = np.array([t.x0 - 1 + 0.5, t.y0 - 1 + 0.5])
    pieces: list[tuple[float, list[float]]] = []
    for contour in contours:
        pts = contour
        if tolerance > 0:
            simplified = cv2.approxPolyDP(contour, float(tolerance), True)
            # Keep small-but-real objects that simplification would collapse to a segment.
            if len(simplified) >= 3:
                pts = simplified
        if len(pts) < 3:
            continue
        xy = pts.reshape(-1, 2)
        area = abs(cv2.contourArea(xy.astype(np.float32)))
        pieces.append((area, (xy + offset).reshape(-1).tolist()))
    pieces.sort(key=lambda item: item[0], reverse=True)
    return [poly for _, poly in pieces]


def mask_from_polygon(points: Sequence[float], width: int, height: int) -> RegionMask:
    """Rasterise a polygon in pixel-edge coordinates (the inverse of :func:`polygons`).

    Uses ``cv2.fillPoly`` (vertices at 1/256 px precision) after moving to pixel-centre coordinates, so
    it is closed: a pixel is set when the polygon overlaps it along the pixel's centre row, and an edge
    lying exactly on a pixel edge also takes the pixel to its right/below. That is slightly fuller than
    centre-inside rasterisers such as pycocotools, and it inverts :func:`polygons` exactly. Parts outside
    the image are clipped. Only the polygon's bounding box is rasterised; the result is the tight mask.
    """
    width, height = check_image_size(width, height)
    try:
        arr = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError("polygon must be a flat list of numbers [x0, y0, x1, y1, ...]") from exc
    if arr.ndim != 1 or arr.size < 6 or arr.size % 2:
        raise ValueError(
            f"polygon must be a flat list [x0, y0, x1, y1, ...] with at least 3 points (6 numbers) and an "
            f"even count, got {arr.size if arr.ndim == 1 else arr.shape} values"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError("polygon coordinates must be finite numbers")
    if np.any(np.abs(arr) > _MAX_POLY_COORD):
        raise ValueError(f"polygon coordinates must be within +/-{_MAX_POLY_COORD:.0f}")
    xy = arr.reshape(-1, 2) - 0.5  # pixel-edge -> pixel-centre (OpenCV) coordinates
    # Region: pixels the polygon can touch (fillPoly rounds vertices), clipped to the image.
    x0 = max(int(math.floor(xy[:, 0].min())), 0)
    y0 = max(int(math.floor(xy[:, 1].min())), 0)
    x1 = min(int(math.ceil(xy[:, 0].max())), width - 1)
    y1 = min(int(math.ceil(xy[:, 1].max())), height - 1)
    if x1 < x0 or y1 < y0:
        return RegionMask.empty(width, height)
    region = np.zeros((y1 - y0 + 1, x1 - x0 + 1), dtype=np.uint8)
    fixed = np.round((xy - (x0, y0)) * (1 << _FILL_SHIFT)).astype(np.int32)
    cv2.fillPoly(region, [fixed], 1, lineType=cv2.LINE_8, shift=_FILL_SHIFT)
    return RegionMask(region.view(bool), x0, y0, width, height).tight()
