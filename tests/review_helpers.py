"""Helpers for the review tests: a seeded detector over make_scene's rectangles (confident, slightly jittered
boxes plus low-confidence noise and a few mistakes of its own), and label errors injected by construction."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.detector import DetectParams
from models.shapes import Shape
from server.formats.annotations import Annotation
from tests.jobs_helpers import CLASS_NAMES, Rect, RectDetector, encode_png, item_index, make_scene

LABELS = list(CLASS_NAMES.values())


def seeded_predictions(index: int, rects: Sequence[Rect], width: int, height: int) -> list[Shape]:
    """What a good detector not trained on the labels would say: each object found with high confidence and
    a pixel of jitter (a few less surely), low-confidence noise boxes, and now and then a confident false
    alarm. Deterministic in `index`."""
    rng = np.random.default_rng(10_000 + index)
    shapes = []
    for r in sorted(rects, key=lambda r: (r.label, r.x0, r.y0, r.x1, r.y1)):  # the order found in pixels
        jitter = rng.integers(-1, 2, 4)
        box = (r.x0 + jitter[0], r.y0 + jitter[1], r.x1 + jitter[2], r.y1 + jitter[3])
        box = (min(box[0], box[2] - 1), min(box[1], box[3] - 1), box[2], box[3])
        conf = rng.uniform(0.96, 0.995) if rng.random() > 0.05 else rng.uniform(0.4, 0.9)
        shapes.append(Shape("box", label=r.label, score=float(conf), box=tuple(float(v) for v in box)))
    for _ in range(int(rng.integers(0, 4))):
        shapes.append(_random_box(rng, width, height, float(rng.uniform(0.01, 0.3))))
    if rng.random() < 0.03:
        shapes.append(_random_box(rng, width, height, float(rng.uniform(0.96, 0.99))))
    return shapes


def _random_box(rng: np.random.Generator, width: int, height: int, conf: float) -> Shape:
    w, h = int(rng.integers(5, 20)), int(rng.integers(5, 20))
    x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
    label = LABELS[int(rng.integers(0, len(LABELS)))]
    return Shape("box", label=label, score=conf, box=(x, y, x + w, y + h))


class SeededRectDetector(RectDetector):
    """RectDetector's rectangles (found in the pixels), scored and noised by seeded_predictions."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(task="detect", **kwargs)  # type: ignore[arg-type]
        self.confs: list[float] = []

    def _find(self, image: np.ndarray, params: DetectParams) -> list[Shape]:
        self.confs.append(params.conf)
        found = super()._find(image, params)
        rects = [Rect(s.label or "", *(int(v) for v in s.box or ())) for s in found]
        height, width = image.shape[:2]
        shapes = seeded_predictions(item_index(image), rects, width, height)
        return [s for s in shapes if (s.score or 0) >= params.conf]


@dataclass
class Injected:
    """The errors put into a dataset: annotated shape ids per kind, and the removed boxes (frame, box)."""

    shape_ids: dict[str, set[str]] = field(default_factory=dict)
    removed: list[tuple[int, tuple[float, float, float, float], str]] = field(default_factory=list)

    def count(self) -> int:
        return sum(len(v) for v in self.shape_ids.values()) + len(self.removed)


@dataclass
class Corpus:
    """Per frame: (name, width, height, true rects, annotations after corruption)."""

    frames: list[tuple[str, int, int, list[Rect], list[Annotation]]]
    injected: Injected


KINDS = ("missing", "shift", "scale", "swap", "spurious")


def make_corpus(count: int, rate: float = 0.1, seed: int = 7) -> Corpus:
    """`count` scenes labelled exactly, then `rate` of the boxes corrupted, the five kinds in turn."""
    rng = np.random.default_rng(seed)
    frames, injected = [], Injected({k: set() for k in KINDS if k != "missing"})
    scenes = [make_scene(i) for i in range(count)]
    total = sum(len(rects) for _, rects in scenes)
    chosen = set(rng.choice(total, size=round(total * rate), replace=False).tolist())
    n = 0
    turn = 0
    for i, (image, rects) in enumerate(scenes):
        height, width = image.shape[:2]
        annotations = []
        for j, r in enumerate(rects):
            shape_id = f"{i}:{j}"
            box = (float(r.x0), float(r.y0), float(r.x1), float(r.y1))
            label = r.label
            if n in chosen:
                kind = KINDS[turn % len(KINDS)]
                turn += 1
                if kind == "missing":
                    injected.removed.append((i, box, label))
                    n += 1
                    continue
                if kind == "shift":
                    w, h = box[2] - box[0], box[3] - box[1]
                    dx, dy = w * 0.45 * rng.choice([-1, 1]), h * 0.45 * rng.choice([-1, 1])
                    box = (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)
                elif kind == "scale":
                    f = float(rng.choice([0.5, 1.8]))
                    cx, cy, w, h = (
                        (box[0] + box[2]) / 2,
                        (box[1] + box[3]) / 2,
                        box[2] - box[0],
                        box[3] - box[1],
                    )
                    box = (cx - w * f / 2, cy - h * f / 2, cx + w * f / 2, cy + h * f / 2)
                elif kind == "swap":
                    label = LABELS[(LABELS.index(label) + 1 + int(rng.integers(0, 2))) % 3]
                elif kind == "spurious":  # the real box stays; a box on empty background is added
                    spurious = _empty_spot(rng, width, height, rects)
                    if spurious is not None:
                        annotations.append(Annotation(f"{i}:x{j}", Shape("box", label=label, box=spurious)))
                        injected.shape_ids["spurious"].add(f"{i}:x{j}")
                    annotations.append(Annotation(shape_id, Shape("box", label=label, box=box)))
                    n += 1
                    continue
                injected.shape_ids[kind].add(shape_id)
            annotations.append(Annotation(shape_id, Shape("box", label=label, box=box)))
            n += 1
        frames.append((f"scene_{i:03d}.png", width, height, rects, annotations))
    return Corpus(frames, injected)


def _empty_spot(rng: np.random.Generator, width: int, height: int, rects: Sequence[Rect]):
    for _ in range(50):
        w, h = int(rng.integers(6, 16)), int(rng.integers(6, 16))
        x, y = int(rng.integers(1, width - w - 1)), int(rng.integers(1, height - h - 1))
        if all(x + w + 2 <= r.x0 or r.x1 + 2 <= x or y + h + 2 <= r.y0 or r.y1 + 2 <= y for r in rects):
            return (float(x), float(y), float(x + w), float(y + h))
    return None


def hits(findings: Sequence, injected: Injected) -> dict[str, int]:
    """How many injected errors of each kind `findings` point at (a removed box: a 'missing' finding whose
    suggested box overlaps it by IoU >= 0.5 in its frame)."""
    flagged = {f.shape_id for f in findings if f.shape_id is not None}
    out = {kind: len(ids & flagged) for kind, ids in injected.shape_ids.items()}
    found = 0
    for frame, box, _ in injected.removed:
        if any(
            f.kind == "missing" and f.frame == frame and _iou(f.suggested_box, box) >= 0.5 for f in findings
        ):
            found += 1
    out["missing"] = found
    return out


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def write_coco_dataset(directory: Path, corpus: Corpus) -> Path:
    """The corpus's images (PNG) and its corrupted annotations as COCO JSON; returns the JSON's path."""
    images, annotations, next_id = [], [], 1
    ids = {name: k for k, name in enumerate(LABELS, start=1)}
    for i, (name, width, height, _, anns) in enumerate(corpus.frames):
        (directory / name).write_bytes(encode_png(make_scene(i)[0]))
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        for a in anns:
            x1, y1, x2, y2 = a.shape.box or (0, 0, 0, 0)
            annotations.append(
                {"id": next_id, "image_id": i + 1, "category_id": ids[a.shape.label or ""],
                 "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0, "area": (x2 - x1) * (y2 - y1),
                 "attributes": {"shape_id": a.shape_id}}
            )  # fmt: skip
            next_id += 1
    categories = [{"id": k, "name": n} for n, k in ids.items()]
    path = directory / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def colour_segmenter(model: str, data: bytes, image: np.ndarray, shapes: list[Shape]) -> list[Shape]:
    """The engine's `refine` for the mask check on make_scene images, as SAM would answer there: each box
    becomes the whole connected region of the colour at its centre (the object, also where it leaves the
    box). A box whose centre is background stays a box, as SAM's empty masks do."""
    import cv2

    from models.shapes import RegionMask

    height, width = image.shape[:2]
    out = []
    for shape in shapes:
        x1, y1, x2, y2 = shape.box or (0, 0, 0, 0)
        cx, cy = min(int((x1 + x2) / 2), width - 1), min(int((y1 + y2) / 2), height - 1)
        colour = image[cy, cx] > 128
        if not colour.any():
            out.append(shape)
            continue
        same = np.all((image > 128) == colour, axis=2).astype(np.uint8)
        _, labels = cv2.connectedComponents(same, connectivity=4)
        region = labels == labels[cy, cx]
        out.append(Shape("mask", label=shape.label, mask=RegionMask.from_full(region).tight()))
    return out


def write_mask_dataset(
    directory: Path, count: int, rate: float = 0.15, seed: int = 5
) -> tuple[Path, set[int]]:
    """make_scene images annotated with exact masks (COCO RLE) and polygons (odd ids), `rate` of them
    eroded or dilated; returns the JSON's path and the annotation ids made sloppy."""
    import cv2

    from models.shapes import RegionMask
    from server.formats.rle import coco_rle

    rng = np.random.default_rng(seed)
    images, annotations, sloppy = [], [], set()
    ids = {name: k for k, name in enumerate(LABELS, start=1)}
    for i in range(count):
        image, rects = make_scene(i)
        height, width = image.shape[:2]
        name = f"m_{i:03d}.png"
        (directory / name).write_bytes(encode_png(image))
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        for r in rects:
            full = np.zeros((height, width), dtype=np.uint8)
            full[r.y0 : r.y1, r.x0 : r.x1] = 1
            ann_id = len(annotations) + 1
            side = min(r.x1 - r.x0, r.y1 - r.y0)
            if rng.random() < rate and side >= 8:
                k = max(2, round(0.2 * side))
                kernel = np.ones((2 * k + 1, 2 * k + 1), np.uint8)
                if rng.random() < 0.5:
                    full = cv2.erode(full, np.ones((3, 3), np.uint8), iterations=k // 2 + 1)
                else:
                    full = cv2.dilate(full, kernel)
                sloppy.add(ann_id)
            mask = RegionMask.from_full(full)
            x, y, w, h = mask.bbox_xywh()
            # Every other one a polygon: the rectangle's outline through its corner pixels' centres, which
            # rasterises back to exactly these pixels.
            outline = [
                [x + 0.5, y + 0.5, x + w - 0.5, y + 0.5, x + w - 0.5, y + h - 0.5, x + 0.5, y + h - 0.5]
            ]
            annotations.append(
                {"id": ann_id, "image_id": i + 1, "category_id": ids[r.label], "bbox": [x, y, w, h],
                 "area": mask.area(), "iscrowd": 0, "segmentation": outline if ann_id % 2 else coco_rle(mask)}
            )  # fmt: skip
    path = directory / "masks.json"
    categories = [{"id": k, "name": n} for n, k in ids.items()]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path, sloppy
