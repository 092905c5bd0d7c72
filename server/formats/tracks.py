"""A video job's tracks as its writers read them: CVAT for video 1.1 XML (cvat_video.py), or MOTChallenge
files as CVAT's "MOT 1.1" imports them (mot.py).

Both number the tracks in order of first appearance (frame, then the tracker's own id): CVAT track ids from 0,
MOT ids from 1. Every frame on which a track was seen is a keyframe. A track that is lost gets an `outside`
shape on the next frame of the job (CVAT's convention), and one that is found again carries on in the same
track. CVAT for video lists each track's shapes together, so they are first grouped by track in a temporary
SQLite file beside the output, never in memory. The same tracks give the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from models.shapes import Shape


@dataclass(frozen=True)
class FrameTracks:
    index: int  # position in the job's frames
    frame: int  # the video's frame number
    width: int
    height: int
    objects: list[tuple[int, Shape]]  # (the tracker's track id, shape), by track id


@dataclass(frozen=True)
class VideoMeta:
    name: str  # the video's file name
    size: int  # frames in the job
    start_frame: int
    stop_frame: int  # the job's last frame, included
    frame_step: int
    fps: float | None


TrackResults = Callable[[], Iterable[FrameTracks]]


class Numbering:
    """Tracker ids → consecutive numbers in order of first appearance."""

    def __init__(self) -> None:
        self.numbers: dict[int, int] = {}

    def of(self, track_id: int) -> int:
        return self.numbers.setdefault(track_id, len(self.numbers))
