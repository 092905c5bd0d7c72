"""Binary mask representation and codecs (CVAT RLE, CVAT detector bitmap, COCO RLE, polygons).

All CVAT/COCO run-length rules live here and nowhere else.

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
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pycocotools.mask as coco_mask

__all__ = [
    "EMPTY_CVAT_RLE",
    "MAX_IMAGE_PIXELS",
    "RegionMask",
    "coco_rle",
    "coco_rle_decode",
    "cvat_detector_mask",
    "cvat_rle",
    "cvat_rle_decode",
    "mask_from_polygon",
    "polygons",
]

# Decoders allocate memory proportional to the image/region size taken from untrusted input; refuse
# anything larger than any image we would ever serve (200 MP) instead of letting the process be OOM-killed.
MAX_IMAGE_PIXELS = 200_000_000

# Largest polygon coordinate accepted by mask_from_polygon: cv2.fillPoly works on int32 with 8 fractional
# bits, so keep far away from overflow.
_MAX_POLY_COORD = float(1 << 22)
_FILL_SHIFT = 8

# CVAT UI convention for "no pixels": one zero-length background run and a degenerate box.
EMPTY_CVAT_RLE: tuple[int, ...] = (0, 0, 0, 0, 0)


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


def _line_runs(bitmap: np.ndarray, along_rows: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Foreground runs within each row (``along_rows``) or column of ``bitmap``.

    Returns ``(line, start, end)`` int arrays (end exclusive), ordered by line then start. Works on strided
    views, so callers never copy or crop the bitmap first.
    """
    h, w = bitmap.shape
    # Change flags with an implicit False before and after every line, so changes pair up (start, end).
    if along_rows:
        d = np.empty((h, w + 1), dtype=bool)
        d[:, 0] = bitmap[:, 0]
        np.not_equal(bitmap[:, 1:], bitmap[:, :-1], out=d[:, 1:w])
        d[:, w] = bitmap[:, -1]
        line, pos = np.divmod(np.flatnonzero(d), w + 1)
    else:
        # Column changes are found in row-major order (cache friendly) and sorted afterwards: there are
        # only as many as there are runs.
        d = np.empty((h + 1, w), dtype=bool)
        d[0] = bitmap[0]
        np.not_equal(bitmap[1:], bitmap[:-1], out=d[1:h])
        d[h] = bitmap[-1]
        pos, line = np.divmod(np.flatnonzero(d), w)
        order = np.lexsort((pos, line))
        line, pos = line[order], pos[order]
    return line[0::2], pos[0::2], pos[1::2]


def _alternating_runs(starts: np.ndarray, ends: np.ndarray, total: int) -> np.ndarray:
    """Background-first alternating run lengths of a length-``total`` sequence whose foreground is the
    sorted, disjoint intervals ``[starts, ends)``. Intervals that touch (across line ends) are merged."""
    if starts.size:
        split = starts[1:] != ends[:-1]
        starts = starts[np.concatenate(([True], split))]
        ends = ends[np.concatenate((split, [True]))]
    runs = np.empty(2 * starts.size + 1, dtype=np.int64)
    runs[0:-1:2] = starts
    runs[2:-1:2] -= ends[:-1]
    runs[1::2] = ends - starts
    runs[-1] = total - (int(ends[-1]) if ends.size else 0)
    # Both CVAT and COCO end with the last non-empty run.
    if runs.size > 1 and runs[-1] == 0:
        runs = runs[:-1]
    return runs


# -- CVAT ------------------------------------------------------------------------------------------------


def cvat_rle(mask: RegionMask) -> list[int]:
    """CVAT mask ``points``: RLE over the tight inclusive bbox, then ``xtl, ytl, xbr, ybr``.

    Runs alternate background/foreground in row-major order over the box and start with a background run,
    which may be 0; ``sum(runs) == (xbr - xtl + 1) * (ybr - ytl + 1)``. Identical to
    ``cvat_sdk.masks.encode_mask(full_bitmap)`` for non-empty masks.

    An empty mask gives ``[0, 0, 0, 0, 0]``, the value the CVAT UI uses for "no pixels" (the SDK's
    ``encode_mask`` gives ``[1, 0, 0, 0, 0]`` instead, and its ``decode_mask`` rejects the UI form;
    prefer not to send empty masks at all).
    """
    if mask.bitmap.size == 0:
        return list(EMPTY_CVAT_RLE)
    # Runs are computed on the region as is; the tight box falls out of them (no crop, no copy).
    row, start, end = _line_runs(mask.bitmap, along_rows=True)
    if row.size == 0:
        return list(EMPTY_CVAT_RLE)
    r0, r1 = int(row[0]), int(row[-1])
    c0, c1 = int(start.min()), int(end.max()) - 1
    w = c1 - c0 + 1
    base = (row - r0) * w - c0
    runs = _alternating_runs(base + start, base + end, (r1 - r0 + 1) * w)
    x0, y0 = mask.x0, mask.y0
    return runs.tolist() + [x0 + c0, y0 + r0, x0 + c1, y0 + r1]


def _as_int_array(values: Any, what: str) -> np.ndarray:
    """Validate a JSON-ish number sequence as int64; integral floats such as ``2.0`` are accepted."""
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a flat list of numbers") from exc
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a flat list of numbers, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{what} contains NaN or infinity")
        if not np.all(arr == np.floor(arr)):
            bad = arr[arr != np.floor(arr)][0]
            raise ValueError(f"{what} must contain integers only, got {bad!r}")
        if np.any(np.abs(arr) > 2.0**62):
            raise ValueError(f"{what} contains a value too large to be a pixel count")
        return arr.astype(np.int64)
    raise ValueError(f"{what} must contain numbers only (got {arr.dtype.name} values)")


def _sum_runs(runs: np.ndarray, limit: int, what: str) -> int:
    """The sum of non-negative ``runs``, each at most ``limit`` pixels. Bounding each run first keeps the
    int64 sum exact: runs near 2**62 used to wrap it around to the expected total and send np.repeat past
    its buffer (a segfault from one request)."""
    if np.any(runs < 0):
        raise ValueError(f"{what} must be non-negative")
    if runs.size and int(runs.max()) > limit:
        raise ValueError(f"{what} include a run of {int(runs.max())}, more than the {limit} pixels there are")
    return int(runs.sum())


def _check_image_size(width: Any, height: Any) -> tuple[int, int]:
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v <= 0:
            raise ValueError(f"image {name} must be a positive integer, got {v!r}")
    if int(width) * int(height) > MAX_IMAGE_PIXELS:
        raise ValueError(f"image size {width}x{height} exceeds the limit of {MAX_IMAGE_PIXELS} pixels")
    return int(width), int(height)


def cvat_rle_decode(points: Sequence[float | int], width: int, height: int) -> RegionMask:
    """Decode CVAT mask ``points`` (``[runs..., xtl, ytl, xbr, ybr]``) for a ``width`` x ``height`` image.

    Returns a RegionMask over the encoded box (not re-tightened). ``[0, 0, 0, 0, 0]`` (the UI's empty mask)
    decodes to an empty mask. Raises ValueError on malformed input.
    """
    width, height = _check_image_size(width, height)
    values = _as_int_array(points, "mask points")
    if values.size < 5:
        raise ValueError(
            f"mask points need at least 5 values (runs followed by xtl, ytl, xbr, ybr), got {values.size}"
        )
    runs = values[:-4]
    xtl, ytl, xbr, ybr = (int(v) for v in values[-4:])
    if np.any(runs < 0):
        raise ValueError("mask run lengths must be non-negative")
    if not np.any(runs) and (xtl, ytl, xbr, ybr) == (0, 0, 0, 0):
        return RegionMask.empty(width, height)
    if not (0 <= xtl <= xbr < width and 0 <= ytl <= ybr < height):
        raise ValueError(
            f"mask box xtl={xtl}, ytl={ytl}, xbr={xbr}, ybr={ybr} (inclusive) is not inside the "
            f"{width}x{height} image (need 0 <= xtl <= xbr < {width} and 0 <= ytl <= ybr < {height})"
        )
    bw, bh = xbr - xtl + 1, ybr - ytl + 1
    total = _sum_runs(runs, bw * bh, "mask run lengths")
    if total != bw * bh:
        raise ValueError(
            f"mask run lengths sum to {total} but the inclusive box {bw}x{bh} has {bw * bh} pixels"
        )
    # Even-indexed runs are background, odd-indexed foreground.
    flags = (np.arange(runs.size) & 1).astype(bool)
    bitmap = np.repeat(flags, runs).reshape(bh, bw)
    return RegionMask(bitmap, xtl, ytl, width, height)


def cvat_detector_mask(mask: RegionMask) -> list[int]:
    """Nuclio detector ``"mask"`` value: flattened row-major bitmap of the tight inclusive box (0 or 255,
    like ``to_cvat_mask`` in CVAT's serverless/openvino/base/shared.py), then ``xtl, ytl, xbr, ybr``.

    CVAT treats any non-zero value as foreground and RLE-encodes it server-side. An empty mask gives
    ``[0, 0, 0, 0, 0]``: a single background pixel at (0, 0), which CVAT stores as ``[1, 0, 0, 0, 0]``.
    Note the list has one entry per box pixel, so it is large for big masks; that is the format.
    """
    t = mask.tight()
    if t.bitmap.size == 0:
        return list(EMPTY_CVAT_RLE)
    h, w = t.bitmap.shape
    values = t.bitmap.astype(np.uint8).reshape(-1) * np.uint8(255)
    return values.tolist() + [t.x0, t.y0, t.x0 + w - 1, t.y0 + h - 1]


# -- COCO ------------------------------------------------------------------------------------------------


def coco_rle(mask: RegionMask) -> dict[str, Any]:
    """Compressed COCO RLE ``{"size": [h, w], "counts": str}`` of the full image (column-major runs).

    The runs are computed from the region (columns outside it and rows above/below it are background) and
    compressed by pycocotools, so the full image is never materialised. Identical to
    ``pycocotools.mask.encode`` of the full Fortran-ordered uint8 mask.
    """
    big_h, big_w = mask.image_height, mask.image_width
    if mask.bitmap.size:
        col, start, end = _line_runs(mask.bitmap, along_rows=False)
        base = (mask.x0 + col) * big_h + mask.y0
        runs = _alternating_runs(base + start, base + end, big_h * big_w)
    else:
        runs = np.array([big_h * big_w], dtype=np.int64)
    rle = coco_mask.frPyObjects({"size": [big_h, big_w], "counts": runs}, big_h, big_w)
    return {"size": [big_h, big_w], "counts": rle["counts"].decode("ascii")}


def _coco_counts_from_string(s: str) -> np.ndarray:
    """Parse pycocotools' compressed counts string (its ``rleFrString``), vectorised and validated.

    Each value is little-endian 5-bit groups in chars ``48 + group`` (bit 0x20 = more follows, bit 0x10 of
    the last group = negative); values from index 3 on are deltas against the value two before.
    Done here rather than by pycocotools so that decoding can skip the empty columns (pycocotools only
    decodes to a full image) and errors say what is wrong.
    """
    try:
        c = np.frombuffer(s.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    except UnicodeEncodeError as exc:
        raise ValueError("COCO RLE counts string has a non-ASCII character") from exc
    if c.size == 0:
        return c
    bad = np.flatnonzero((c < 0) | (c > 63))
    if bad.size:
        raise ValueError(f"COCO RLE counts string has an invalid character {s[bad[0]]!r} at {bad[0]}")
    more = (c & 0x20) != 0
    if more[-1]:
        raise ValueError("COCO RLE counts string is truncated")
    last = np.flatnonzero(~more)
    first = np.concatenate(([0], last[:-1] + 1))
    length = last - first + 1
    if length.max() > 7:  # 35 bits: far beyond any pixel count; also keeps int64 sums exact
        raise ValueError("COCO RLE counts string has an out-of-range value")
    shift = 5 * (np.arange(c.size) - np.repeat(first, length))
    values = np.add.reduceat((c & 0x1F) << shift, first)
    negative = (c[last] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * length[negative])
    values[1::2] = np.cumsum(values[1::2])
    values[2::2] = np.cumsum(values[2::2])
    return values


def coco_rle_decode(rle: dict[str, Any]) -> RegionMask:
    """Decode a COCO RLE dict (``counts`` compressed str/bytes or uncompressed list of ints).

    Returns the tight RegionMask. Only the band of columns containing foreground is materialised.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError('COCO RLE must be a dict with "size": [height, width] and "counts"')
    size = rle["size"]
    if not isinstance(size, list | tuple) or len(size) != 2:
        raise ValueError(f'COCO RLE "size" must be [height, width], got {size!r}')
    width, height = _check_image_size(size[1], size[0])
    raw = rle["counts"]
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", errors="replace")
    if isinstance(raw, str):
        counts = _coco_counts_from_string(raw)
    elif isinstance(raw, list | tuple | np.ndarray):
        counts = _as_int_array(raw, 'COCO RLE "counts"')
    else:
        raise ValueError('COCO RLE "counts" must be a string (compressed) or a list of ints (uncompressed)')
    total = _sum_runs(counts, width * height, 'COCO RLE "counts"')
    if total != width * height:
        raise ValueError(f'COCO RLE "counts" sum to {total}, expected height*width = {width * height}')

    ends = np.cumsum(counts)
    starts = ends - counts
    fg = (np.arange(counts.size) & 1).astype(bool) & (counts > 0)
    if not fg.any():
        return RegionMask.empty(width, height)
    # Runs are column-major (index = x * height + y): decode just the columns holding foreground.
    first = int(starts[fg][0])
    last = int(ends[fg][-1]) - 1
    cx0, cx1 = first // height, last // height
    lo, hi = cx0 * height, (cx1 + 1) * height
    lengths = np.clip(ends, lo, hi) - np.clip(starts, lo, hi)
    flags = (np.arange(counts.size) & 1).astype(bool)
    band = np.repeat(flags, lengths).reshape(cx1 - cx0 + 1, height).T
    return RegionMask(band, cx0, 0, width, height).tight()


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
    width, height = _check_image_size(width, height)
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
