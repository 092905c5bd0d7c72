"""Helpers for the job tests: synthetic images whose ground truth is known by construction, and a small
deterministic Detector that finds the coloured rectangles in them (threshold + connected components)."""

from __future__ import annotations

import io
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from models.base import UnknownModel
from models.detector import Detector, DetectorInfo, DetectParams
from models.shapes import RegionMask, Shape
from server.settings import Settings

CLASS_NAMES = {0: "red", 1: "green", 2: "blue"}
COLORS = {"red": (230, 40, 40), "green": (40, 230, 40), "blue": (40, 40, 230)}


@dataclass(frozen=True)
class Rect:
    label: str
    x0: int
    y0: int
    x1: int  # exclusive: pixel-edge coordinates, as boxes are
    y1: int


@dataclass(frozen=True)
class Scene:
    name: str
    width: int
    height: int
    rects: tuple[Rect, ...]


def make_scene(index: int) -> tuple[np.ndarray, list[Rect]]:
    """Dark noise with up to 4 non-touching coloured rectangles; pixel (0, 0) encodes `index`, so the
    detector can tell which item it was given."""
    rng = np.random.default_rng(index)
    width, height = int(rng.integers(64, 129)), int(rng.integers(48, 97))
    image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    image[0, 0] = (index % 50, index // 50 % 50, 0)
    rects = []
    cell_w, cell_h = (width - 4) // 2, (height - 4) // 2
    for cy in range(2):
        for cx in range(2):
            if rng.random() < 0.3:
                continue
            w, h = int(rng.integers(4, cell_w - 3)), int(rng.integers(4, cell_h - 3))
            x0 = 4 + cx * cell_w + int(rng.integers(0, cell_w - w - 2))
            y0 = 4 + cy * cell_h + int(rng.integers(0, cell_h - h - 2))
            label = CLASS_NAMES[int(rng.integers(0, 3))]
            image[y0 : y0 + h, x0 : x0 + w] = COLORS[label]
            rects.append(Rect(label, x0, y0, x0 + w, y0 + h))
    return image, rects


def encode_png(image: np.ndarray) -> bytes:
    # Not conftest's encode_image: importing conftest loads the whole app (and torch) in the crash worker.
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def item_index(image: np.ndarray) -> int:
    return int(image[0, 0, 0]) + 50 * int(image[0, 0, 1])


def write_dataset(directory: Path, count: int, corrupt: bool = False) -> dict[str, Scene]:
    """PNG scenes (every fourth in a subfolder, to exercise recursion) → ground truth by relative name."""
    truth = {}
    for i in range(count):
        image, rects = make_scene(i)
        name = f"sub/scene_{i:03d}.png" if i % 4 == 3 else f"scene_{i:03d}.png"
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(encode_png(image))
        truth[name] = Scene(name, image.shape[1], image.shape[0], tuple(rects))
    (directory / "notes.txt").write_text("not an image, and not listed: wrong extension")
    if corrupt:
        good = encode_png(make_scene(999)[0])
        (directory / "broken.png").write_bytes(good[: len(good) // 2])  # truncated
        (directory / "text.jpg").write_text("this is not a JPEG")
    return truth


class RectDetector(Detector):
    """Finds the rectangles make_scene draws: boxes for task "detect", masks for task "segment".

    Counts its calls per item, optionally sleeps per batch (to be slow enough to interrupt) and appends each
    item index it sees to `log` (for the crash test, whose detector runs in another process)."""

    def __init__(self, task: str = "segment", delay: float = 0.0, log: Path | None = None) -> None:
        self.info = DetectorInfo(name="rects", task=task, class_names=dict(CLASS_NAMES))  # type: ignore[arg-type]
        self.delay = delay
        self.log = log
        self.calls: Counter[int] = Counter()
        self.batches: list[int] = []
        self._lock = threading.Lock()

    def detect(self, images: Sequence[np.ndarray], params: DetectParams) -> list[list[Shape]]:
        indices = [item_index(image) for image in images]
        with self._lock:
            self.calls.update(indices)
            self.batches.append(len(images))
            if self.log is not None:
                with open(self.log, "a") as f:
                    f.write("".join(f"{i}\n" for i in indices))
        if self.delay:
            time.sleep(self.delay)
        return [self._find(image, params) for image in images]

    def _find(self, image: np.ndarray, params: DetectParams) -> list[Shape]:
        height, width = image.shape[:2]
        bright = image > 128
        shapes = []
        for class_id, name in CLASS_NAMES.items():
            if params.classes is not None and class_id not in params.classes:
                continue
            want = np.array([c > 128 for c in COLORS[name]])
            hit = np.all(bright == want, axis=2).astype(np.uint8)
            count, labels, stats, _ = cv2.connectedComponentsWithStats(hit, connectivity=4)
            for k in range(1, count):
                x, y, w, h = (int(v) for v in stats[k, :4])
                if self.info.task == "detect":
                    shapes.append(Shape("box", label=name, score=0.9, box=(x, y, x + w, y + h)))
                else:
                    mask = RegionMask(labels[y : y + h, x : x + w] == k, x, y, width, height)
                    shapes.append(Shape("mask", label=name, score=0.9, mask=mask))
        return sorted(shapes, key=lambda s: (s.label, s.bounds()))


def wait_for(
    engine: object,
    job_id: str,
    states: Sequence[str] = ("completed", "failed", "cancelled"),
    timeout: float = 30,
):
    """Poll the engine until the job reaches one of `states` (`timeout` seconds at most)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = engine.status(job_id)  # type: ignore[attr-defined]
        if status.state in states:
            return status
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} still {status.state} after {timeout} s: {status}")


def rect_models(settings: Settings, detector: str, sam: str | None) -> tuple[Callable[[str], Detector], None]:
    """The Ray engine's `models` for the job tests: a RectDetector built in each Ray actor, which appends its
    process id to DATA_DIR/actor-pids (so a test can kill it) and the item indices it sees to
    DATA_DIR/calls.log. A detector named `rects-slow` sleeps 0.25 s per batch (slow enough to interrupt);
    `rects-missing` cannot be loaded."""
    if detector == "rects-missing":  # as the registry does when a worker lacks the weights
        raise UnknownModel(detector)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.data_dir / "actor-pids", "a") as f:
        f.write(f"{os.getpid()}\n")
    found = RectDetector(delay=0.25 if detector == "rects-slow" else 0.0, log=settings.data_dir / "calls.log")
    return (lambda _: found), None
