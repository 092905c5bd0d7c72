"""Sliced detection for images much larger than the detector's input (aerial, pathology, 12+ MP photos).

Shrunk whole to `imgsz`, such an image loses its small objects. Here the detector also sees overlapping tiles
at full resolution, and the whole image once, so that objects larger than a tile stay whole. The views are
detected in one call (one batch where the backend batches), shifted back to image coordinates, and merged:
- a detection that touches a tile's inner edge is cut by it and dropped: the overlap shows every object up
  to the overlap's size whole in some tile, and the whole-image view covers the larger ones;
- what several views found of one object is kept once, with its best score (`_merge`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from models.shapes import Keypoint, RegionMask, Shape

if TYPE_CHECKING:
    from models.detector import DetectParams

EDGE_PX = 2.0  # a detection this close to a tile's inner edge is taken as cut by it
SAME_OBJECT = 0.7  # share of the smaller box covered by a box of the same label from another view

Detect = Callable[[list[np.ndarray], "DetectParams"], list[list[Shape]]]
Box = tuple[float, float, float, float]
_Found = tuple[int, Shape, Box | None]  # (view, shape in image coordinates, its bounds; None for tags)


MAX_TILES = 1024  # per image: the crops are held in memory together, and each is a forward pass


class TooManyTiles(ValueError):
    pass


def _step(size: int, overlap: float) -> int:
    return max(1, round(size * (1 - overlap)))


def check_tile_count(width: int, height: int, size: int, overlap: float) -> None:
    """Raises TooManyTiles when `windows` would cut the image into more than MAX_TILES tiles (counted
    without making them: a fine grid on a large image would be millions)."""

    def count(length: int) -> int:
        return 1 if length <= size else -(-(length - size) // _step(size, overlap)) + 1

    tiles = count(width) * count(height)
    if tiles > MAX_TILES:
        raise TooManyTiles(
            f"'tile' {size} with 'tile_overlap' {overlap:g} cuts this {width}x{height} image into {tiles} "
            f"tiles, more than {MAX_TILES}; use larger tiles or less overlap."
        )


def windows(width: int, height: int, size: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) of `size`-pixel tiles covering the image, neighbours sharing `overlap` of a side; the
    last row and column end at the image's border."""

    def starts(length: int) -> list[int]:
        if length <= size:
            return [0]
        return sorted({*range(0, length - size, _step(size, overlap)), length - size})

    return [
        (x, y, min(x + size, width), min(y + size, height)) for y in starts(height) for x in starts(width)
    ]


def detect_tiled(detect: Detect, images: Sequence[np.ndarray], params: DetectParams) -> list[list[Shape]]:
    """`detect` over the whole images and their tiles of `params.tile` pixels, merged per image."""
    assert params.tile is not None
    whole = replace(params, tile=None)
    views: list[tuple[int, tuple[int, int, int, int] | None]] = []  # (image, tile window or None: whole)
    crops: list[np.ndarray] = []
    for index, image in enumerate(images):
        height, width = image.shape[:2]
        views.append((index, None))
        crops.append(image)
        if max(width, height) <= params.tile:
            continue  # the detector sees it at full resolution already
        check_tile_count(width, height, params.tile, params.tile_overlap)
        for window in windows(width, height, params.tile, params.tile_overlap):
            x0, y0, x1, y1 = window
            views.append((index, window))
            crops.append(np.ascontiguousarray(image[y0:y1, x0:x1]))
    found = detect(crops, whole)
    merged: list[list[_Found]] = [[] for _ in images]
    for view, ((index, window), shapes) in enumerate(zip(views, found, strict=True)):
        height, width = images[index].shape[:2]
        dx, dy = (0, 0) if window is None else window[:2]
        inner = (False,) * 4 if window is None else _inner_edges(window, width, height)
        for shape in shapes:
            bounds = shape.bounds()  # in the view's coordinates
            if bounds is not None and _touches(bounds, window, inner):
                continue
            if window is not None:
                shape = _shifted(shape, dx, dy, width, height)
            moved = (
                None if bounds is None else (bounds[0] + dx, bounds[1] + dy, bounds[2] + dx, bounds[3] + dy)
            )
            merged[index].append((view, shape, moved))
    return [_merge(shapes, params.iou)[: params.max_det] for shapes in merged]


def _inner_edges(window: tuple[int, int, int, int], width: int, height: int) -> tuple[bool, ...]:
    """Which of the tile's edges (left, top, right, bottom) lie inside the image."""
    x0, y0, x1, y1 = window
    return (x0 > 0, y0 > 0, x1 < width, y1 < height)


def _touches(bounds: Box, window: tuple[int, ...] | None, inner: tuple[bool, ...]) -> bool:
    if window is None:
        return False
    x0, y0, x1, y1 = bounds  # in tile coordinates
    w, h = window[2] - window[0], window[3] - window[1]
    near = (x0 <= EDGE_PX, y0 <= EDGE_PX, x1 >= w - EDGE_PX, y1 >= h - EDGE_PX)
    return any(n and i for n, i in zip(near, inner, strict=True))


def _shifted(shape: Shape, dx: int, dy: int, width: int, height: int) -> Shape:
    """`shape` found in a tile at (dx, dy), in the coordinates of the width × height image."""
    if shape.box is not None:
        x0, y0, x1, y1 = shape.box
        return replace(shape, box=(x0 + dx, y0 + dy, x1 + dx, y1 + dy))
    if shape.mask is not None:
        m = shape.mask
        return replace(shape, mask=RegionMask(m.bitmap, m.x0 + dx, m.y0 + dy, width, height))
    if shape.polygon is not None:
        moved = [v + (dx if i % 2 == 0 else dy) for i, v in enumerate(shape.polygon)]
        return replace(shape, polygon=moved)
    if shape.keypoints is not None:
        return replace(
            shape,
            keypoints=[Keypoint(k.name, k.x + dx, k.y + dy, k.visible, k.score) for k in shape.keypoints],
        )
    return shape


def _merge(found: list[_Found], iou: float) -> list[Shape]:
    """Greedy, highest score first. A shape is dropped when a kept shape of the same label from another view
    overlaps it by `iou` or more, or covers SAME_OBJECT of the smaller one: two views rarely box one object
    identically (different context), and their boxes can overlap less than the IoU threshold. Shapes of one
    view never drop each other (the detector's own NMS has ruled on them); tags are kept."""
    kept: list[tuple[int, Shape, Box]] = []
    ranked = sorted(
        ((view, shape, box) for view, shape, box in found if box is not None),
        key=lambda item: -(item[1].score if item[1].score is not None else 1.0),
    )
    for view, shape, box in ranked:
        if not any(
            other_view != view and other.label == shape.label and _same_object(box, other_box, iou)
            for other_view, other, other_box in kept
        ):
            kept.append((view, shape, box))
    return [shape for _, shape, _ in kept] + [shape for _, shape, box in found if box is None]


def _same_object(a: Box, b: Box, iou: float) -> bool:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return False
    inter = w * h
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter) >= iou or inter / min(area_a, area_b) >= SAME_OBJECT
