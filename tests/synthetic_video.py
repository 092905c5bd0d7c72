"""Synthetic videos with ground truth by construction, generated lazily (10,000 frames never sit in memory).

Objects are textured discs and rectangles on a textured background: one moves and grows, one passes behind an
occluder (the grey bar, drawn over everything), one leaves the frame. Truth per frame and object: the visible
mask's bounding box in pixel-edge coordinates (x1, y1, x2, y2), or None when nothing of it is visible.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class SceneObject:
    kind: str  # "disc" or "rect"
    color: tuple[int, int, int]
    start: tuple[float, float]  # centre (x, y) at frame 0, as a fraction of the frame
    velocity: tuple[float, float]  # pixels per frame
    size: float  # radius or half-side at frame 0, pixels
    growth: float  # size multiplier per frame


def default_objects(width: int, height: int) -> list[SceneObject]:
    return [
        SceneObject("disc", (220, 60, 50), (0.2, 0.3), (2.0, 0.6), min(width, height) * 0.07, 1.002),
        SceneObject("rect", (40, 200, 80), (0.15, 0.72), (3.0, 0.0), min(width, height) * 0.08, 1.0),
        SceneObject("rect", (60, 90, 230), (0.75, 0.4), (4.0, -0.5), min(width, height) * 0.06, 1.0),
    ]


@dataclass
class SyntheticVideo:
    width: int = 640
    height: int = 360
    frames: int = 60
    seed: int = 0
    occluder: bool = True
    loop: int = 0  # > 0: objects wrap around every `loop` frames, so any length stays in view

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        noise = rng.integers(70, 140, (self.height // 8 + 1, self.width // 8 + 1, 3), dtype=np.uint8)
        self.background = cv2.resize(noise, (self.width, self.height), interpolation=cv2.INTER_NEAREST)
        self.objects = default_objects(self.width, self.height)
        # Each object carries its own texture, which moves and scales with it (trackers follow texture).
        self.tiles = []
        for obj in self.objects:
            side = 64
            grain = rng.integers(-40, 40, (side // 4, side // 4, 1), dtype=np.int16)
            grain = cv2.resize(grain.astype(np.float32), (side, side), interpolation=cv2.INTER_NEAREST)
            tile = np.clip(np.array(obj.color, np.float32) + grain[..., None], 0, 255).astype(np.uint8)
            self.tiles.append(tile)
        x = int(self.width * 0.45)  # a vertical bar the disc and the green rectangle pass behind
        self.occluder_span = (x, x + max(self.width // 12, 4)) if self.occluder else None

    def _geometry(self, obj: SceneObject, t: int) -> tuple[float, float, float]:
        if self.loop:
            t %= self.loop
        cx = obj.start[0] * self.width + obj.velocity[0] * t
        cy = obj.start[1] * self.height + obj.velocity[1] * t + 8 * math.sin(t / 9)
        return cx, cy, obj.size * obj.growth**t

    def frame(self, t: int) -> tuple[np.ndarray, list[Box | None]]:
        """Frame t (RGB uint8) and each object's visible bounding box."""
        image = self.background.copy()
        masks = []
        for obj, tile in zip(self.objects, self.tiles, strict=True):
            cx, cy, size = self._geometry(obj, t)
            x0, y0, side = round(cx - size), round(cy - size), max(round(2 * size), 1)
            shape = np.zeros((side, side), np.uint8)
            if obj.kind == "disc":
                cv2.circle(shape, (side // 2, side // 2), side // 2, 1, -1)
            else:
                shape[:] = 1
            texture = cv2.resize(tile, (side, side), interpolation=cv2.INTER_NEAREST)
            mask = np.zeros((self.height, self.width), bool)
            # Paste with clipping at the frame's borders.
            fx0, fy0 = max(x0, 0), max(y0, 0)
            fx1, fy1 = min(x0 + side, self.width), min(y0 + side, self.height)
            if fx1 > fx0 and fy1 > fy0:
                part = shape[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0].astype(bool)
                region = image[fy0:fy1, fx0:fx1]
                np.copyto(region, texture[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0], where=part[..., None])
                mask[fy0:fy1, fx0:fx1] = part
            masks.append(mask)
        visible = []
        for index, mask in enumerate(masks):
            for later in masks[index + 1 :]:  # later objects are drawn on top of earlier ones
                mask = mask & ~later
            visible.append(mask)
        if self.occluder_span:
            x0, x1 = self.occluder_span
            image[:, x0:x1] = (128, 128, 128)
            for mask in visible:
                mask[:, x0:x1] = False
        return image, [_box(mask) for mask in visible]

    def __iter__(self) -> Iterator[tuple[np.ndarray, list[Box | None]]]:
        for t in range(self.frames):
            yield self.frame(t)

    def write(self, path: Path, fps: int = 25, codec: str = "libx264") -> list[list[Box | None]]:
        """Encode the video with PyAV; returns the per-frame truth."""
        import av

        truth = []
        with av.open(str(path), "w") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
            for image, boxes in self:
                truth.append(boxes)
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return truth


def _box(mask: np.ndarray) -> Box | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def box_iou(a: Box | None, b: Box | None) -> float:
    if a is None or b is None:
        return float(a is None and b is None)
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def encode(
    frames: Iterator[np.ndarray],
    width: int,
    height: int,
    path: Path,
    fps: int = 25,
    preset: str = "veryfast",
    faststart: bool = False,
) -> int:
    """Encode RGB frames to H.264 with PyAV (a key frame every 50 frames); returns the count. `faststart`
    puts an mp4's index first, so that a truncated copy still opens (and fails later, mid-stream)."""
    import av

    count = 0
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": preset, "g": "50"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for image in frames:
            count += 1
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return count


@dataclass(frozen=True)
class Sprite:
    """A photo crop moving in straight lines: its top-left corner and height at frame t."""

    image: np.ndarray  # RGB
    start: tuple[float, float]  # top-left (x, y) at frame 0, pixels
    velocity: tuple[float, float]  # pixels per frame
    height: float  # pixels at frame 0
    growth: float = 1.0  # height multiplier per frame

    def rect(self, t: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) pasted at frame t, in integer pixel edges."""
        height = max(round(self.height * self.growth**t), 2)
        width = max(round(height * self.image.shape[1] / self.image.shape[0]), 2)
        x0 = round(self.start[0] + self.velocity[0] * t)
        y0 = round(self.start[1] + self.velocity[1] * t)
        return x0, y0, x0 + width, y0 + height


@dataclass
class SpriteVideo:
    """Real photos of objects (crops of bus.jpg's people) pasted at known places on a textured background,
    with an occluding grey bar drawn over everything. Truth per frame and sprite: the box of its visible
    pixels, and the fraction of its pasted area that is visible (0 when out of view or hidden)."""

    sprites: list[Sprite]
    width: int = 480
    height: int = 270
    frames: int = 90
    seed: int = 0
    occluder: tuple[int, int] | None = None  # x span of the bar
    loop: int = 0  # > 0: sprites start over every `loop` frames, so any length has them in view

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        noise = rng.integers(90, 150, (self.height // 12 + 1, self.width // 12 + 1, 3), dtype=np.uint8)
        background = cv2.resize(noise, (self.width, self.height), interpolation=cv2.INTER_LINEAR)
        self.background = background

    def frame(self, t: int) -> tuple[np.ndarray, list[tuple[Box | None, float]]]:
        if self.loop:
            t %= self.loop
        image = self.background.copy()
        masks, areas = [], []
        for sprite in self.sprites:
            x0, y0, x1, y1 = sprite.rect(t)
            pasted = cv2.resize(sprite.image, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
            mask = np.zeros((self.height, self.width), bool)
            fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x1, self.width), min(y1, self.height)
            if fx1 > fx0 and fy1 > fy0:
                image[fy0:fy1, fx0:fx1] = pasted[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
                mask[fy0:fy1, fx0:fx1] = True
            masks.append(mask)
            areas.append((x1 - x0) * (y1 - y0))
        if self.occluder is not None:
            image[:, self.occluder[0] : self.occluder[1]] = (128, 128, 128)
        truth = []
        for index, (mask, area) in enumerate(zip(masks, areas, strict=True)):
            for later in masks[index + 1 :]:
                mask = mask & ~later
            if self.occluder is not None:
                mask[:, self.occluder[0] : self.occluder[1]] = False
            truth.append((_box(mask), float(mask.sum()) / area))
        return image, truth

    def __iter__(self) -> Iterator[tuple[np.ndarray, list[tuple[Box | None, float]]]]:
        for t in range(self.frames):
            yield self.frame(t)

    def write(
        self, path: Path, fps: int = 25, preset: str = "veryfast"
    ) -> list[list[tuple[Box | None, float]]]:
        truth: list[list[tuple[Box | None, float]]] = []

        def images() -> Iterator[np.ndarray]:
            for image, boxes in self:
                truth.append(boxes)
                yield image

        encode(images(), self.width, self.height, path, fps, preset)
        return truth


@dataclass
class PanVideo:
    """A camera panning over a photo: frame t is the window at `offset(t)` (photo pixels), scaled to
    `width` x `height`. Boxes in the photo map to frame boxes by `project`: truth by construction."""

    photo: np.ndarray  # RGB
    window: tuple[int, int]  # (width, height) in photo pixels
    start: tuple[int, int]  # window's top-left at frame 0
    end: tuple[int, int]  # ... at the last frame
    width: int = 320
    height: int = 480
    frames: int = 60
    pan_frames: int | None = None  # the camera reaches `end` at this frame and holds (default: the last)

    def offset(self, t: int) -> tuple[float, float]:
        f = min(t / max(self.pan_frames or self.frames - 1, 1), 1.0)
        return self.start[0] + (self.end[0] - self.start[0]) * f, self.start[1] + (
            self.end[1] - self.start[1]
        ) * f

    def frame(self, t: int) -> np.ndarray:
        ox, oy = self.offset(t)
        sx, sy = self.width / self.window[0], self.height / self.window[1]
        affine = np.array([[sx, 0.0, -ox * sx], [0.0, sy, -oy * sy]])
        return cv2.warpAffine(self.photo, affine, (self.width, self.height), flags=cv2.INTER_AREA)

    def project(self, box: Box, t: int) -> tuple[Box | None, float]:
        """A photo box in frame t: clipped to the frame, with the fraction of it inside."""
        ox, oy = self.offset(t)
        sx, sy = self.width / self.window[0], self.height / self.window[1]
        x1, y1, x2, y2 = (box[0] - ox) * sx, (box[1] - oy) * sy, (box[2] - ox) * sx, (box[3] - oy) * sy
        cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, self.width), min(y2, self.height)
        if cx2 <= cx1 or cy2 <= cy1:
            return None, 0.0
        return (cx1, cy1, cx2, cy2), (cx2 - cx1) * (cy2 - cy1) / ((x2 - x1) * (y2 - y1))

    def write(self, path: Path, fps: int = 25, faststart: bool = False) -> None:
        frames = (self.frame(t) for t in range(self.frames))
        encode(frames, self.width, self.height, path, fps, faststart=faststart)
