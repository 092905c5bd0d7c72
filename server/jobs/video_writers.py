"""A video job's tracks → CVAT for video 1.1 XML, or MOTChallenge files as CVAT's "MOT 1.1" imports them.

Both number the tracks in order of first appearance (frame, then the tracker's own id): CVAT track ids from 0,
MOT ids from 1. Every frame on which a track was seen is a keyframe. A track that is lost gets an `outside`
shape on the next frame of the job (CVAT's convention), and one that is found again carries on in the same
track. CVAT for video lists each track's shapes together, so they are first grouped by track in a temporary
SQLite file beside the output, never in memory. The same tracks give the same bytes.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from models.detector import DetectorInfo
from models.shapes import Shape
from server.jobs.serde import shape_from_dict, shape_to_dict
from server.jobs.writers import (
    CVAT_FILE,
    MOT_GT,
    MOT_LABELS,
    MOT_SEQINFO,
    LabelTable,
    _atomic,
    _cvat_label,
    _f2,
    _Xml,
    label_of,
    output_paths,
)
from server.masks import cvat_rle


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


class _Numbering:
    """Tracker ids → consecutive numbers in order of first appearance."""

    def __init__(self) -> None:
        self.numbers: dict[int, int] = {}

    def of(self, track_id: int) -> int:
        return self.numbers.setdefault(track_id, len(self.numbers))


# -- CVAT for video 1.1 ----------------------------------------------------------------------------------


def write_cvat_video(path: Path, info: DetectorInfo, tracks: TrackResults, meta: VideoMeta) -> None:
    """Tracks of boxes (or masks, for segmentation models: CVAT's RLE over the mask's box, as in the image
    writer). A track takes the label it was seen with most often (the first on a tie)."""
    table = LabelTable.for_detector(info)
    numbering = _Numbering()
    labels: dict[int, Counter[str]] = {}
    width = height = 0
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tracks-") as scratch:
        db = sqlite3.connect(Path(scratch) / "tracks.sqlite3", isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=OFF")
            db.execute("CREATE TABLE shapes (track INTEGER, frame INTEGER, shape TEXT)")
            db.execute("BEGIN")
            for frame in tracks():
                width, height = (width, height) if width else (frame.width, frame.height)
                rows = []
                for track_id, shape in frame.objects:
                    number = numbering.of(track_id)
                    table.see(shape)
                    labels.setdefault(number, Counter())[label_of(shape)] += 1
                    rows.append((number, frame.frame, json.dumps(shape_to_dict(shape))))
                db.executemany("INSERT INTO shapes VALUES (?, ?, ?)", rows)
            db.execute("COMMIT")
            db.execute("CREATE INDEX by_track ON shapes (track, frame)")
            with _atomic(path) as out:
                xml = _Xml(out)
                xml.gen.startDocument()
                xml.open("annotations")
                xml.leaf("version", "1.1")
                _cvat_video_meta(xml, table, meta, width, height)
                ordered = db.execute("SELECT track, frame, shape FROM shapes ORDER BY track, frame")
                for number, rows in itertools.groupby(ordered, key=lambda row: row[0]):
                    label = labels[number].most_common(1)[0][0]
                    xml.open("track", {"id": str(number), "label": label, "source": "auto"})
                    seen = [(frame, shape_from_dict(json.loads(data))) for _, frame, data in rows]
                    _cvat_track_shapes(xml, seen, meta)
                    xml.close("track")
                xml.close("annotations")
                xml.gen.ignorableWhitespace("\n")
                xml.gen.endDocument()
        finally:
            db.close()


def _cvat_video_meta(xml: _Xml, table: LabelTable, meta: VideoMeta, width: int, height: int) -> None:
    xml.open("meta")
    xml.open("task")
    xml.leaf("name", meta.name)
    xml.leaf("size", str(meta.size))
    xml.leaf("mode", "interpolation")
    xml.leaf("start_frame", str(meta.start_frame))
    xml.leaf("stop_frame", str(meta.stop_frame))
    xml.leaf("frame_filter", f"step={meta.frame_step}" if meta.frame_step > 1 else "")
    xml.open("labels")
    for name in table.ids:
        _cvat_label(xml, name, "any", [])
    xml.close("labels")
    xml.open("original_size")
    xml.leaf("width", str(width))
    xml.leaf("height", str(height))
    xml.close("original_size")
    xml.close("task")
    xml.leaf("source", meta.name)
    xml.close("meta")


def _cvat_track_shapes(xml: _Xml, seen: list[tuple[int, Shape]], meta: VideoMeta) -> None:
    """One track's keyframes; an outside shape after each last frame it was seen on, if the job goes on."""
    for (frame, shape), following in itertools.zip_longest(seen, seen[1:]):
        _cvat_track_shape(xml, frame, shape, outside=False)
        after = frame + meta.frame_step
        lost = following is None or following[0] != after
        if lost and after <= meta.stop_frame:
            _cvat_track_shape(xml, after, shape, outside=True)


def _cvat_track_shape(xml: _Xml, frame: int, shape: Shape, outside: bool) -> None:
    attrs = {"frame": str(frame), "keyframe": "1", "outside": str(int(outside)), "occluded": "0"}
    if shape.kind == "mask" and shape.mask is not None and not shape.mask.is_empty:
        *runs, xtl, ytl, xbr, ybr = cvat_rle(shape.mask)
        tag = "mask"
        attrs |= {
            "rle": ", ".join(map(str, runs)),
            "left": str(xtl),
            "top": str(ytl),
            "width": str(xbr - xtl + 1),
            "height": str(ybr - ytl + 1),
        }
    else:
        bounds = shape.bounds()
        assert bounds is not None
        tag = "box"
        attrs |= dict(zip(("xtl", "ytl", "xbr", "ybr"), map(_f2, bounds), strict=True))
    xml.open(tag, attrs | {"z_order": "0"})
    xml.close(tag)


# -- MOT -------------------------------------------------------------------------------------------------


def write_mot(directory: Path, info: DetectorInfo, tracks: TrackResults, meta: VideoMeta) -> None:
    """gt/gt.txt: `frame,id,x,y,w,h,score,class,visibility` per tracked object, frames numbered from 1 in
    the job's order, ids from 1, class a 1-based line of gt/labels.txt, visibility 1 (unknown); the score
    stands where MOTChallenge results put their confidence, and where CVAT's MOT import reads 0 as "ignored".
    seqinfo.ini as MOTChallenge's (no img1 folder is written)."""
    table = LabelTable.for_detector(info)
    numbering = _Numbering()
    width = height = 0
    (directory / MOT_GT).parent.mkdir(parents=True, exist_ok=True)
    with _atomic(directory / MOT_GT) as out:
        for frame in tracks():
            width, height = (width, height) if width else (frame.width, frame.height)
            for track_id, shape in frame.objects:
                bounds = shape.bounds()
                if bounds is None:
                    continue
                x1, y1, x2, y2 = bounds
                score = shape.score if shape.score is not None else 1.0
                row = (
                    f"{frame.index + 1},{numbering.of(track_id) + 1},{_f2(x1)},{_f2(y1)},{_f2(x2 - x1)},"
                    f"{_f2(y2 - y1)},{score:.4f},{table.see(shape) + 1},1"
                )
                out.write(row + "\n")
    with _atomic(directory / MOT_LABELS) as out:
        out.write("".join(f"{name}\n" for name in table.names().values()))
    fps = meta.fps / meta.frame_step if meta.fps else 25.0
    seqinfo = [
        "[Sequence]",
        f"name={Path(meta.name).stem}",
        "imDir=img1",
        f"frameRate={max(round(fps), 1)}",
        f"seqLength={meta.size}",
        f"imWidth={width}",
        f"imHeight={height}",
        "imExt=.jpg",
    ]
    with _atomic(directory / MOT_SEQINFO) as out:
        out.write("\n".join(seqinfo) + "\n")
