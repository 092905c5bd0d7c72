"""A large image of small people with its ground truth, for the sliced-detection test and benchmark."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from server.inputs.images import decode_image

from .conftest import ultralytics_asset
from .synthetic_video import Box, box_iou

Detect = Callable[[np.ndarray], list[tuple[str, Box]]]  # an image → (label, box) per detection


def small_people_canvas(detect: Detect) -> tuple[np.ndarray, list[tuple[str, Box]]]:
    """bus.jpg at a third of its size, pasted 12 times into a 4000x3000 grey canvas (some copies straddle tile
    edges). The truth: what `detect` finds on one copy alone, at 1:1 in a 640x640 canvas, at each copy."""
    bus = decode_image(ultralytics_asset("bus.jpg").read_bytes(), 10**8)
    small = cv2.resize(bus, (270, 360), interpolation=cv2.INTER_AREA)
    alone = np.full((640, 640, 3), 114, np.uint8)
    alone[0:360, 0:270] = small
    people = detect(alone)
    canvas = np.full((3000, 4000, 3), 114, np.uint8)
    truth = []
    for row in range(3):
        for col in range(4):
            x, y = 150 + col * 980, 200 + row * 950
            canvas[y : y + 360, x : x + 270] = small
            truth += [(label, (b[0] + x, b[1] + y, b[2] + x, b[3] + y)) for label, b in people]
    return canvas, truth


def found_of(found: list[tuple[str, Box]], truth: list[tuple[str, Box]], at_least: float) -> int:
    """How many truth boxes a detection of the same label overlaps by `at_least` IoU."""
    return sum(any(lb == label and box_iou(b, box) >= at_least for lb, b in found) for label, box in truth)
