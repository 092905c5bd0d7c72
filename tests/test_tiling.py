"""Sliced detection (`tile`): the windows cover the image, cut detections are dropped, duplicates merged, and
small objects lost when the whole image is shrunk to `imgsz` are found; ground truth by construction, then
the real person detector on a large canvas of small people."""

from __future__ import annotations

import base64
from collections.abc import Sequence

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.detector import Detector, DetectorInfo, DetectParams, run_detection
from models.shapes import Shape
from models.tiling import TooManyTiles, check_tile_count, windows

from .conftest import encode_image
from .jobs_helpers import RectDetector
from .tiling_helpers import found_of, small_people_canvas

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0)}


class ShrinkingRects(Detector):
    """Finds solid red and green rectangles as a CNN detector would: on the image shrunk to `imgsz` (long
    side), where anything under 6 pixels is missed, with boxes scaled back."""

    def __init__(self) -> None:
        self.info = DetectorInfo(name="rects", task="detect", class_names={0: "red", 1: "green"})
        self.calls: list[int] = []

    def detect(self, images: Sequence[np.ndarray], params: DetectParams) -> list[list[Shape]]:
        self.calls.append(len(images))
        return [self._find(image, params.imgsz) for image in images]

    def _find(self, image: np.ndarray, imgsz: int) -> list[Shape]:
        height, width = image.shape[:2]
        scale = min(1.0, imgsz / max(height, width))
        seen = image if scale == 1 else cv2.resize(image, (round(width * scale), round(height * scale)),
                                                   interpolation=cv2.INTER_AREA)  # fmt: skip
        shapes = []
        for label, color in COLORS.items():
            hit = np.all(np.abs(seen.astype(int) - color) < 60, axis=2).astype(np.uint8)
            count, _, stats, _ = cv2.connectedComponentsWithStats(hit, connectivity=4)
            for x, y, w, h, _ in stats[1:count]:
                if min(w, h) >= 6:
                    box = (x / scale, y / scale, (x + w) / scale, (y + h) / scale)
                    shapes.append(Shape("box", label=label, score=min(0.99, 0.5 + w * h / 1e4), box=box))
        return shapes


def scene(width: int, height: int, seed: int) -> tuple[np.ndarray, list[tuple[str, tuple[int, ...]]]]:
    """Dark noise with small (16-40 px) and a few large (200-400 px) rectangles that do not touch."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 50, (height, width, 3), dtype=np.uint8)
    taken = np.zeros((height, width), bool)
    truth = []
    for size_range, count in (((16, 41), 40), ((200, 401), 3)):
        placed = 0
        while placed < count:
            w, h = (int(v) for v in rng.integers(*size_range, 2))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            if taken[max(y - 4, 0) : y + h + 4, max(x - 4, 0) : x + w + 4].any():
                continue
            taken[y : y + h, x : x + w] = True
            label = ("red", "green")[placed % 2]
            image[y : y + h, x : x + w] = COLORS[label]
            truth.append((label, (x, y, x + w, y + h)))
            placed += 1
    return image, truth


def matches(found: list[Shape], truth: list[tuple[str, tuple[int, ...]]], at_least: float) -> int:
    return found_of([(s.label, s.box) for s in found], truth, at_least)


@pytest.mark.parametrize(
    ("width", "height", "size", "overlap"),
    [(100, 80, 640, 0.2), (3000, 2000, 640, 0.2), (1281, 640, 640, 0.5), (5000, 37, 256, 0.0)],
)
def test_windows_cover_the_image_with_the_overlap_asked(width: int, height: int, size: int, overlap: float):
    tiles = windows(width, height, size, overlap)
    covered = np.zeros((height, width), int)
    for x0, y0, x1, y1 in tiles:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height and x1 - x0 <= size and y1 - y0 <= size
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    xs = sorted({x0 for x0, *_ in tiles})
    assert all(b - a <= round(size * (1 - overlap)) for a, b in zip(xs, xs[1:], strict=False))


def test_tiles_find_the_small_objects_once_each_and_whole() -> None:
    image, truth = scene(4000, 3000, seed=3)
    small = [t for t in truth if t[1][2] - t[1][0] <= 40 and t[1][3] - t[1][1] <= 40]
    detector = ShrinkingRects()
    untiled = run_detection(detector, [image], DetectParams(imgsz=640))[0]
    tiled = run_detection(detector, [image], DetectParams(imgsz=640, tile=640, tile_overlap=0.2))[0]

    assert matches(untiled, small, 0.5) < len(small) // 4  # shrunk 6.25 times, most are under 6 px
    assert matches(tiled, small, 0.99) == len(small)  # at full resolution, exact
    assert matches(tiled, truth, 0.9) == len(truth)  # the large ones come whole (from the whole image)
    assert len(tiled) == len(truth)  # no duplicates from overlapping tiles, no pieces of cut objects
    assert detector.calls == [1, 1 + len(windows(4000, 3000, 640, 0.2))]  # one call: every view together


def test_masks_are_shifted_into_the_whole_image() -> None:
    image, truth = scene(1500, 1100, seed=5)
    shapes = run_detection(RectDetector("segment"), [image], DetectParams(tile=256, tile_overlap=0.25))[0]
    assert len(shapes) == len(truth)
    for label, (x0, y0, x1, y1) in truth:
        mask = next(s.mask for s in shapes if s.label == label and s.mask.x0 == x0 and s.mask.y0 == y0)
        assert (mask.image_width, mask.image_height) == (1500, 1100)
        assert mask.bitmap.sum() == (x1 - x0) * (y1 - y0)


def test_the_real_person_detector_finds_small_people_only_with_tiles(detect_client: TestClient) -> None:
    def detect(image: np.ndarray, **tiling: object) -> list[tuple[str, tuple[float, ...]]]:
        body = {"image": {"base64": b64(image)}, **tiling}
        shapes = detect_client.post("/v1/detect/fall", json=body).json()["shapes"]
        return [(s["label"], tuple(s["box"])) for s in shapes]

    canvas, truth = small_people_canvas(detect)
    assert truth, "the checkpoint finds people in one copy"
    untiled, tiled = detect(canvas), detect(canvas, tile=640, tile_overlap=0.3)
    hits = {"tiled": found_of(tiled, truth, 0.7), "untiled": found_of(untiled, truth, 0.7)}
    print(f"\npeople found (IoU >= 0.7) of {len(truth)}: {hits}; detections: {len(tiled)} / {len(untiled)}")
    assert hits["tiled"] >= 0.9 * len(truth) > hits["untiled"]


def test_tiling_a_classifier_is_refused(detect_client: TestClient) -> None:
    body = {"image": {"base64": b64(np.zeros((64, 64, 3), np.uint8))}, "tile": 640}
    response = detect_client.post("/v1/detect/cls", json=body)
    assert response.status_code == 422 and response.json()["error"]["code"] == "unsupported_tiling"


def b64(image: np.ndarray) -> str:
    return base64.b64encode(encode_image(image)).decode()


def test_a_tile_grid_too_fine_for_the_image_is_a_422_not_millions_of_crops(detect_client: TestClient) -> None:
    """64-pixel tiles at 0.9 overlap would cut a 2000x2000 image into 104,976 crops held in memory at once."""
    image = np.zeros((2000, 2000, 3), np.uint8)
    body = {"image": {"base64": b64(image)}, "tile": 64, "tile_overlap": 0.9}
    response = detect_client.post("/v1/detect/fall", json=body)
    assert response.status_code == 422 and response.json()["error"]["code"] == "too_many_tiles"
    assert "104976 tiles" in response.json()["error"]["message"]
    assert len(windows(2000, 2000, 64, 0.9)) == 104976  # counted as it would be cut
    with pytest.raises(TooManyTiles):  # jobs call the detector directly: the image fails, with this message
        run_detection(ShrinkingRects(), [image], DetectParams(tile=64, tile_overlap=0.9))
    check_tile_count(2000, 2000, 256, 0.5)  # 225 tiles: allowed
