"""MOTChallenge files (gt/gt.txt, gt/labels.txt, seqinfo.ini), as CVAT's "MOT 1.1" imports them."""

from __future__ import annotations

from pathlib import Path

from models.detector import DetectorInfo
from server.formats.files import MOT_GT, MOT_LABELS, MOT_SEQINFO, LabelTable, atomic, f2
from server.formats.tracks import Numbering, TrackResults, VideoMeta


def write_mot(directory: Path, info: DetectorInfo, tracks: TrackResults, meta: VideoMeta) -> None:
    """gt/gt.txt: `frame,id,x,y,w,h,score,class,visibility` per tracked object, frames numbered from 1 in
    the job's order, ids from 1, class a 1-based line of gt/labels.txt, visibility 1 (unknown); the score
    stands where MOTChallenge results put their confidence, and where CVAT's MOT import reads 0 as "ignored".
    seqinfo.ini as MOTChallenge's (no img1 folder is written)."""
    table = LabelTable.for_detector(info)
    numbering = Numbering()
    width = height = 0
    (directory / MOT_GT).parent.mkdir(parents=True, exist_ok=True)
    with atomic(directory / MOT_GT) as out:
        for frame in tracks():
            width, height = (width, height) if width else (frame.width, frame.height)
            for track_id, shape in frame.objects:
                bounds = shape.bounds()
                if bounds is None:
                    continue
                x1, y1, x2, y2 = bounds
                score = shape.score if shape.score is not None else 1.0
                row = (
                    f"{frame.index + 1},{numbering.of(track_id) + 1},{f2(x1)},{f2(y1)},{f2(x2 - x1)},"
                    f"{f2(y2 - y1)},{score:.4f},{table.see(shape) + 1},1"
                )
                out.write(row + "\n")
    with atomic(directory / MOT_LABELS) as out:
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
    with atomic(directory / MOT_SEQINFO) as out:
        out.write("\n".join(seqinfo) + "\n")
