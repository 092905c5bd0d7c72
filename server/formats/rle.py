"""Mask codecs (CVAT RLE, CVAT detector bitmap, COCO RLE); the mask type itself is models.shapes.RegionMask.

All CVAT/COCO run-length rules live here and nowhere else.

Coordinate conventions (see docs "C. Shapes CVAT accepts", and models/shapes.py):

* Pixel ``(x, y)`` is column ``x``, row ``y``; in *pixel-edge* coordinates it covers the square
  ``[x, x+1) x [y, y+1)``, so a full image box is ``[0, 0, W, H]``.
* CVAT mask boxes are *inclusive* integer pixel indices ``xtl, ytl, xbr, ybr``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pycocotools.mask as coco_mask

from models.shapes import RegionMask, check_image_size

__all__ = [
    "EMPTY_CVAT_RLE",
    "coco_rle",
    "coco_rle_decode",
    "cvat_detector_mask",
    "cvat_rle",
    "cvat_rle_decode",
]

# CVAT UI convention for "no pixels": one zero-length background run and a degenerate box.
EMPTY_CVAT_RLE: tuple[int, ...] = (0, 0, 0, 0, 0)


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


def cvat_rle_decode(points: Sequence[float | int], width: int, height: int) -> RegionMask:
    """Decode CVAT mask ``points`` (``[runs..., xtl, ytl, xbr, ybr]``) for a ``width`` x ``height`` image.

    Returns a RegionMask over the encoded box (not re-tightened). ``[0, 0, 0, 0, 0]`` (the UI's empty mask)
    decodes to an empty mask. Raises ValueError on malformed input.
    """
    width, height = check_image_size(width, height)
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
    width, height = check_image_size(size[1], size[0])
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
