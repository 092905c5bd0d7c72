"""Which writer makes which dataset format: a job's stored results (or tracks) in, files out.

Image formats: cvat_images (server.formats.cvat_xml), coco (server.formats.coco), yolo (server.formats.yolo);
video formats: cvat_video (server.formats.cvat_video), mot (server.formats.mot).
"""

from __future__ import annotations

from pathlib import Path

from models.detector import DetectorInfo
from server.formats.coco import write_coco
from server.formats.cvat_video import write_cvat_video
from server.formats.cvat_xml import write_cvat_images
from server.formats.files import COCO_FILE, CVAT_FILE, Results, output_paths
from server.formats.mot import write_mot
from server.formats.tracks import TrackResults, VideoMeta
from server.formats.yolo import write_yolo


def write_output(
    fmt: str, directory: Path, info: DetectorInfo, results: Results, polygon_tolerance: float = 1.0
) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "cvat_images":
        write_cvat_images(directory / CVAT_FILE, info, results)
    elif fmt == "coco":
        write_coco(directory / COCO_FILE, info, results)
    elif fmt == "yolo":
        write_yolo(directory, info, results, polygon_tolerance)
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    return output_paths(fmt, directory)


def write_video_output(
    fmt: str, directory: Path, info: DetectorInfo, tracks: TrackResults, meta: VideoMeta
) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "cvat_video":
        write_cvat_video(directory / CVAT_FILE, info, tracks, meta)
    elif fmt == "mot":
        write_mot(directory, info, tracks, meta)
    else:
        raise ValueError(f"unknown video output format {fmt!r}")
    return output_paths(fmt, directory)
