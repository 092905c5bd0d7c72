"""Whole-video pre-labeling jobs: the real fall-detection checkpoint with ByteTrack / BoT-SORT on videos whose
truth is known by construction (people cut from bus.jpg pasted where the test puts them; a camera panning
over bus.jpg), the CVAT for video and MOT outputs read back against the job's stored tracks, an s3:// video,
bad videos at submit (4xx) and mid-job (failed frames), and the CLI."""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from models.detector import DetectorInfo
from models.shapes import RegionMask, Shape
from server.api.errors import install_error_handlers
from server.api.routes.jobs import router
from server.cli import prelabel as cli
from server.errors import ApiError
from server.formats.cvat_video import write_cvat_video
from server.formats.mot import write_mot
from server.formats.rle import cvat_rle_decode
from server.formats.stored import shape_from_dict
from server.formats.tracks import FrameTracks, VideoMeta
from server.inputs.video import copy_path
from server.jobs.engine import LocalEngine
from server.jobs.spec import JobSpec
from server.settings import Settings

from .conftest import make_settings
from .jobs_helpers import RectDetector
from .s3_helpers import HeaderContract, moto_s3
from .synthetic_video import box_iou
from .video_helpers import (
    BUS_PEOPLE,
    Track,
    TrackShape,
    boxes_by_frame,
    bus_pan,
    fall_detector,
    people_scene,
    read_cvat_video,
    read_mot,
    run_job,
    score_object,
)


@pytest.fixture(scope="module")
def fall() -> object:
    return fall_detector()


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[Callable[..., LocalEngine]]:
    engines: list[LocalEngine] = []

    def make(detectors: dict[str, object], settings: Settings | None = None) -> LocalEngine:
        settings = settings or Settings(data_dir=tmp_path / "data")
        db = tmp_path / f"jobs-{len(engines)}.sqlite3"
        engines.append(LocalEngine(lambda name: detectors[name], state_db=db, readers=0, settings=settings))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def video_job(video: Path | str, out: Path, fmt: str, **extra: object) -> dict:
    body = {
        "source": {"video": str(video)},
        "detector": "fall",
        "output": {"format": fmt, "directory": str(out)},
    }
    return body | extra


def stored_tracks(engine: LocalEngine, job_id: str) -> list[FrameTracks]:
    """The job's results as the store holds them (what the writers read)."""
    frames = []
    for item in engine.store.items(job_id, status="done"):
        assert item.result is not None and item.width is not None and item.height is not None
        objects = [(d.pop("track"), shape_from_dict(d)) for d in json.loads(item.result)]
        frames.append(FrameTracks(item.index, int(item.ref), item.width, item.height, objects))
    return frames


# -- people pasted at known places -----------------------------------------------------------------------


@dataclass
class PeopleRun:
    truth: list[list]  # per frame: (visible box, visible fraction) of walker, comer, leaver
    xml: Path
    stored: list[FrameTracks]


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory, fall: object) -> Iterator[PeopleRun]:
    directory = tmp_path_factory.mktemp("people")
    truth = people_scene().write(directory / "people.mp4")
    engine = LocalEngine(
        lambda _: fall, state_db=directory / "jobs.sqlite3", readers=0,
        settings=Settings(data_dir=directory / "data"),
    )  # fmt: skip
    try:
        body = video_job(directory / "people.mp4", directory / "out", "cvat_video", params={"imgsz": 640})
        status = run_job(engine, body)
        assert (status.state, status.done, status.failed) == ("completed", 80, 0), status
        yield PeopleRun(truth, directory / "out" / "annotations.xml", stored_tracks(engine, status.id))
    finally:
        engine.close()


def test_tracks_follow_the_people_with_stable_ids(people: PeopleRun) -> None:
    _, tracks = read_cvat_video(people.xml)
    found = boxes_by_frame(tracks)
    names = ("walker (passes behind the bar)", "comer (grows)", "leaver (walks out)")
    scores = [score_object([frame[k] for frame in people.truth], found, 0.5) for k in range(3)]
    for name, score in zip(names, scores, strict=True):
        print(f"{name}: mean IoU {score.mean_iou:.3f} over {score.judged} frames, matched "
              f"{score.matched:.0%}, track ids {score.ids}, id switches {score.switches}")  # fmt: skip
        assert score.mean_iou >= 0.7, name
        assert score.matched >= 0.9, name
    walker, comer, leaver = scores
    assert comer.switches == 0 and leaver.switches == 0
    assert walker.switches <= 1  # one id across the occlusion is the ideal; ByteTrack may start a new one

    # Boxes that belong to nobody (the fall model also fires on things that are not people).
    boxes = [(frame, box) for frame, by_id in found.items() for box in by_id.values()]
    stray = [
        (frame, box) for frame, box in boxes
        if max(box_iou(box, truth) for truth, _ in people.truth[frame] if truth is not None) < 0.3
    ]  # fmt: skip
    print(f"stray boxes: {len(stray)} of {len(boxes)}")
    assert len(stray) <= 0.05 * len(boxes)

    # The leaver's track ends once it is out of the frame: an outside shape right after its last box.
    gone = next(t for t, frame in enumerate(people.truth) if t > 0 and frame[2][1] == 0)
    (track,) = [t for t in tracks if t.id == leaver.ids[-1]]
    last = max(track.boxes())
    assert last < gone
    assert [s.frame for s in track.shapes if s.outside] == [last + 1]
    assert not any(
        box[0] > 560 and box[1] < 60 for frame in range(gone, 80) for box in found.get(frame, {}).values()
    )


def test_cvat_video_xml_holds_exactly_the_stored_tracks(people: PeopleRun) -> None:
    root, tracks = read_cvat_video(people.xml)
    task = root.find("meta/task")
    assert task is not None
    meta = {e.tag: e.text or "" for e in task if len(e) == 0}
    assert meta == {"name": "people.mp4", "size": "80", "mode": "interpolation", "start_frame": "0",
                    "stop_frame": "79", "frame_filter": ""}  # fmt: skip
    assert [n.text for n in task.iter("name") if n.text != "people.mp4"] == ["Normal", "Fall"]
    assert (task.findtext("original_size/width"), task.findtext("original_size/height")) == ("640", "360")
    assert_tracks_match(tracks, people.stored, step=1, stop_frame=79)


def assert_tracks_match(tracks: list[Track], stored: list[FrameTracks], step: int, stop_frame: int) -> None:
    """Track i is the i-th tracker id to appear; its keyframes are exactly the stored boxes, its label the
    most common stored one, and it has an outside shape right after every run of frames it was seen on."""
    order: dict[int, int] = {}
    seen: dict[int, dict[int, Shape]] = {}
    for frame in stored:
        for track_id, shape in frame.objects:
            order.setdefault(track_id, len(order))
            seen.setdefault(track_id, {})[frame.frame] = shape
    assert [t.id for t in tracks] == list(range(len(order)))
    for track_id, number in order.items():
        track, shapes = tracks[number], seen[track_id]
        assert track.label == Counter(s.label for s in shapes.values()).most_common(1)[0][0]
        expected = []
        for frame, shape in sorted(shapes.items()):
            bounds = shape.bounds()
            assert bounds is not None
            expected.append(TrackShape(frame, False, True, tuple(round(v, 2) for v in bounds)))
            if frame + step not in shapes and frame + step <= stop_frame:
                expected.append(TrackShape(frame + step, True, True, tuple(round(v, 2) for v in bounds)))
        got = [
            TrackShape(s.frame, s.outside, s.keyframe, tuple(round(v, 2) for v in s.box))
            for s in track.shapes
        ]
        assert got == expected, number


# -- a camera panning over bus.jpg -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pan_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pan") / "pan.mp4"
    bus_pan().write(path)
    return path


def test_pan_over_bus_keeps_one_id_per_person_and_mot_matches(
    pan_video: Path, fall: object, make_engine: Callable[..., LocalEngine], tmp_path: Path
) -> None:
    engine = make_engine({"fall": fall})
    status = run_job(engine, video_job(pan_video, tmp_path / "mot", "mot", params={"imgsz": 512}))
    assert (status.state, status.done) == ("completed", 60), status
    labels, rows = read_mot(tmp_path / "mot")
    assert labels == ["Normal", "Fall"]
    found: dict[int, dict[int, tuple]] = {}
    for frame, track, box, _, _ in rows:
        found.setdefault(frame - 1, {})[track] = box
    pan = bus_pan()
    for name, person in BUS_PEOPLE.items():
        truth = [pan.project(person, t) for t in range(pan.frames)]
        score = score_object(truth, found, 0.9)  # judged while (nearly) all of him is in view
        print(f"{name}: mean IoU {score.mean_iou:.3f} over {score.judged} frames, ids {score.ids}")
        assert score.judged >= 10 and score.mean_iou >= 0.7 and score.matched >= 0.9, name
        assert len(score.ids) == 1 and score.switches == 0, name

    # The MOT rows are the stored tracks: frames from 1, ids from 1 in order of appearance.
    order: dict[int, int] = {}
    expected = []
    for frame in stored_tracks(engine, status.id):
        for track_id, shape in frame.objects:
            x1, y1, x2, y2 = shape.bounds() or (0, 0, 0, 0)
            number = order.setdefault(track_id, len(order) + 1)
            expected.append((frame.index + 1, number, (x1, y1, x2, y2), shape.score, shape.label))
    assert len(rows) == len(expected) > 60
    for row, want in zip(rows, expected, strict=True):
        assert row[:2] == want[:2] and row[4] == want[4]
        assert row[2] == pytest.approx(want[2], abs=0.011) and row[3] == pytest.approx(want[3], abs=1e-4)
    seqinfo = (tmp_path / "mot" / "seqinfo.ini").read_text().splitlines()
    assert seqinfo[0] == "[Sequence]"
    assert {"seqLength=60", "imWidth=384", "imHeight=512", "frameRate=25", "name=pan"} <= set(seqinfo)


def test_botsort_on_a_frame_range(
    pan_video: Path, fall: object, make_engine: Callable[..., LocalEngine], tmp_path: Path
) -> None:
    engine = make_engine({"fall": fall})
    body = video_job(
        pan_video, tmp_path / "out", "cvat_video", params={"imgsz": 512}, tracker={"type": "botsort"}
    )
    body["source"]["frames"] = {"start": 6, "stop": 56, "step": 2}
    status = run_job(engine, body)
    assert (status.state, status.total, status.done) == ("completed", 26, 26), status
    root, tracks = read_cvat_video(tmp_path / "out" / "annotations.xml")
    task = root.find("meta/task")
    assert task is not None
    assert [task.findtext(k) for k in ("size", "start_frame", "stop_frame", "frame_filter")] == [
        "26", "6", "56", "step=2",
    ]  # fmt: skip
    job_frames = set(range(6, 57, 2))
    assert {s.frame for t in tracks for s in t.shapes} <= job_frames
    assert_tracks_match(tracks, stored_tracks(engine, status.id), step=2, stop_frame=56)
    pan = bus_pan()
    middle = [pan.project(BUS_PEOPLE["middle"], t) if t in job_frames else (None, 0.0) for t in range(60)]
    score = score_object(middle, boxes_by_frame(tracks), 0.9)
    assert score.judged >= 8 and score.mean_iou >= 0.7 and len(score.ids) == 1


def test_s3_video_is_downloaded_then_removed_and_tracks_equal_a_local_run(
    pan_video: Path, fall: object, make_engine: Callable[..., LocalEngine], tmp_path: Path
) -> None:
    contract = HeaderContract()
    with moto_s3() as moto:
        moto.create_bucket("videos")
        moto.client().upload_file(str(pan_video), "videos", "clips/pan.mp4")
        settings = make_settings(
            tmp_path, storage_profiles={"b2": moto.profile(["videos"])}, data_dir=tmp_path / "data"
        )
        contract.watch(settings)
        engine = make_engine({"fall": fall}, settings)
        url = "s3://videos/clips/pan.mp4"
        frames = {"stop": 15}
        remote = video_job(url, tmp_path / "s3", "mot", params={"imgsz": 320})
        remote["source"]["frames"] = frames
        status = run_job(engine, remote)
        assert status.state == "completed", status
        assert not copy_path(url, settings).exists()  # the local copy went with the job
        missing = video_job("s3://videos/clips/none.mp4", tmp_path / "x", "mot")
        assert error_of(engine, missing) == (404, "s3_not_found")
    assert contract.violations == []
    local = video_job(pan_video, tmp_path / "local", "mot", params={"imgsz": 320})
    local["source"]["frames"] = frames
    assert run_job(engine, local).state == "completed"
    for name in ("gt/gt.txt", "gt/labels.txt", "seqinfo.ini"):
        assert (tmp_path / "s3" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


def error_of(engine: LocalEngine, body: dict) -> tuple[int, str]:
    with pytest.raises(ApiError) as caught:
        engine.submit(JobSpec.model_validate(body))
    return caught.value.status, caught.value.code


# -- bad videos --------------------------------------------------------------------------------------------


def audio_only(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_bad_videos_are_refused_at_submit_with_4xx(pan_video: Path, tmp_path: Path) -> None:
    engine = LocalEngine(
        lambda name: {"rects": RectDetector("detect"), "pose": RectDetector("pose")}[name],
        state_db=tmp_path / "jobs.sqlite3", readers=0, settings=Settings(data_dir=tmp_path / "data"),
    )  # fmt: skip
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.jobs = engine
    whole = pan_video.read_bytes()
    (tmp_path / "random.mp4").write_bytes(
        np.random.default_rng(0).integers(0, 256, 50_000, np.uint8).tobytes()
    )
    (tmp_path / "truncated.mp4").write_bytes(whole[: len(whole) // 2])  # its index (moov) was at the end
    (tmp_path / "text.mkv").write_text("not a video at all")
    audio_only(tmp_path / "voice.m4a")
    (tmp_path / "images").mkdir()
    out = str(tmp_path / "out")

    def body(video: str, **extra: object) -> dict:
        return {
            "source": {"video": video},
            "detector": "rects",
            "output": {"format": "mot", "directory": out},
        } | extra

    images = {"source": {"directory": str(tmp_path / "images")}, "detector": "rects"}
    cases = [
        (body(str(tmp_path / "random.mp4")), (415, "unsupported_video")),
        (body(str(tmp_path / "truncated.mp4")), (415, "unsupported_video")),
        (body(str(tmp_path / "text.mkv")), (415, "unsupported_video")),
        (body(str(tmp_path / "voice.m4a")), (415, "unsupported_video")),
        (body(str(tmp_path / "missing.mp4")), (400, "source_not_found")),
        (body(str(tmp_path / "images")), (400, "source_not_found")),
        (
            body(str(pan_video)) | {"source": {"video": str(pan_video), "frames": {"start": 60}}},
            (400, "source_empty"),
        ),
        (body(str(pan_video)) | {"detector": "pose"}, (422, "unsupported_detector")),
        (body("ftp://host/video.mp4"), (400, "unsupported_url")),
        (body("s3://videos/a.mp4"), (403, "s3_not_configured")),
        (body(str(pan_video), sam_refine="mobile_sam"), (422, "invalid_request")),
        (body(str(pan_video), tracker={"type": "sort"}), (422, "invalid_request")),
        (images | {"output": {"format": "cvat_video", "directory": out}}, (422, "invalid_request")),
        (images | {"output": {"format": "coco", "directory": out}, "tracker": {}}, (422, "invalid_request")),
    ]
    try:
        with TestClient(app) as client:
            for payload, expected in cases:
                response = client.post("/v1/jobs", json=payload)
                error = response.json()["error"]
                assert (response.status_code, error["code"]) == expected, (payload, error)
                print(expected, error["message"])
            assert client.get("/v1/jobs").json()["jobs"] == []  # nothing was stored
    finally:
        engine.close()


@pytest.fixture(scope="module")
def small_pan(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The pan at 192x256 as an mp4 with its index first, so that a damaged copy still opens."""
    pan = bus_pan()
    pan.width, pan.height = 192, 256
    path = tmp_path_factory.mktemp("small") / "pan.mp4"
    pan.write(path, faststart=True)
    return path.read_bytes()


def truncated(whole: bytes) -> bytes:
    return whole[: int(len(whole) * 0.6)]


def garbled(whole: bytes) -> bytes:
    middle = len(whole) // 2
    noise = np.random.default_rng(1).integers(0, 256, 2048, np.uint8).tobytes()
    return whole[:middle] + noise + whole[middle + 2048 :]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [(truncated, "the video ends at frame {last}, before frame {first}"),
     (garbled, "the video cannot be decoded from frame {first} on: ")],
)  # fmt: skip
def test_a_video_that_breaks_midway_fails_its_later_frames_clearly(
    small_pan: bytes,
    fall: object,
    make_engine: Callable[..., LocalEngine],
    tmp_path: Path,
    damage: Callable[[bytes], bytes],
    reason: str,
) -> None:
    (tmp_path / "broken.mp4").write_bytes(damage(small_pan))
    engine = make_engine({"fall": fall})
    body = video_job(tmp_path / "broken.mp4", tmp_path / "out", "cvat_video", params={"imgsz": 256})
    status = run_job(engine, body)
    assert status.state == "completed" and status.total == 60, status  # the container says 60 frames
    assert 10 < status.done < 60 and status.done + status.failed == 60
    failures = status.failures
    assert [f.index for f in failures] == list(range(status.done, min(status.done + 20, 60)))
    assert failures[0].image == f"frame_{status.done:06d}"
    assert failures[0].error.startswith(reason.format(first=status.done, last=status.done - 1))
    assert len({f.error for f in failures}) == 1
    print(failures[0].error)
    _, tracks = read_cvat_video(tmp_path / "out" / "annotations.xml")
    assert tracks and max(s.frame for t in tracks for s in t.shapes if not s.outside) < status.done


def test_shutdown_midway_then_resume_with_read_ahead_equals_a_straight_run(
    fall: object, tmp_path: Path
) -> None:
    """Reading ahead in a thread (the CUDA default), a graceful stop (server shutdown) and a resume in
    another engine, reading inline: the same output as one uninterrupted inline run."""
    pan = bus_pan(150)
    pan.width, pan.height = 192, 256
    pan.write(tmp_path / "pan.mp4")
    settings = Settings(data_dir=tmp_path / "data")

    def engine(db: str, readers: int) -> LocalEngine:
        return LocalEngine(lambda _: fall, state_db=tmp_path / db, readers=readers, settings=settings)

    def body(out: str) -> dict:
        return video_job(
            tmp_path / "pan.mp4", tmp_path / out, "cvat_video", params={"imgsz": 256}, batch_size=4
        )

    first = engine("stopped.sqlite3", readers=2)
    job = first.submit(JobSpec.model_validate(body("resumed")))
    while (status := first.status(job.id)).done == 0:
        assert status.state in ("queued", "running"), status
        time.sleep(0.05)
    first.close()  # as at server shutdown: the batch in flight is committed, the job goes back to queued
    stopped = LocalEngine(lambda _: fall, state_db=tmp_path / "stopped.sqlite3", settings=settings)
    assert (stopped.status(job.id).state, stopped.status(job.id).done % 4) == ("queued", 0)
    stopped.close()

    second = engine("stopped.sqlite3", readers=0)
    try:
        assert second.resume_unfinished() == [job.id]
        while (status := second.status(job.id)).state in ("queued", "running"):
            time.sleep(0.1)
        assert (status.state, status.done) == ("completed", 150), status
        straight = engine("straight.sqlite3", readers=0)
        try:
            assert run_job(straight, body("straight")).state == "completed"
        finally:
            straight.close()
    finally:
        second.close()
    resumed = (tmp_path / "resumed" / "annotations.xml").read_bytes()
    assert resumed == (tmp_path / "straight" / "annotations.xml").read_bytes()


def test_image_formats_write_one_image_per_frame(
    small_pan: bytes, fall: object, make_engine: Callable[..., LocalEngine], tmp_path: Path
) -> None:
    (tmp_path / "pan.mp4").write_bytes(small_pan)
    engine = make_engine({"fall": fall})
    body = video_job(tmp_path / "pan.mp4", tmp_path / "out", "yolo", params={"imgsz": 256})
    body["source"]["frames"] = {"start": 4, "stop": 9}
    status = run_job(engine, body)
    assert (status.state, status.done) == ("completed", 6), status
    labels = sorted(p.name for p in (tmp_path / "out" / "labels").iterdir())
    assert labels == [f"frame_{n:06d}.txt" for n in range(4, 10)]
    rows = [
        line.split()
        for name in labels
        for line in (tmp_path / "out" / "labels" / name).read_text().splitlines()
    ]
    stored = [shape for frame in stored_tracks(engine, status.id) for _, shape in frame.objects]
    assert len(rows) == len(stored) > 6 and all(len(row) == 5 for row in rows)  # class cx cy w h


# -- writers, on tracks made by hand -------------------------------------------------------------------------


def test_video_writers_on_masks_gaps_and_a_frame_step(tmp_path: Path) -> None:
    """Frames 10, 12, ..., 20: a mask track lost at 14 and found again at 16; a box track whose label
    changes (the most common one wins); a track seen only on the last frame (nothing after it)."""
    bitmap = np.zeros((5, 6), bool)
    bitmap[1:4, 1:5] = True
    bitmap[2, 2] = False
    mask = Shape("mask", label="person", score=0.9, mask=RegionMask(bitmap, 20, 10, 50, 40))

    def box(label: str, x: float) -> Shape:
        return Shape("box", label=label, score=0.5, box=(x, 1.0, x + 5.0, 9.5))

    plan = {10: [(7, mask)], 12: [(3, box("person", 1)), (7, mask)], 14: [(3, box("car", 2))],
            16: [(3, box("car", 3)), (7, mask)], 18: [(3, box("car", 4)), (7, mask)],
            20: [(3, box("car", 5)), (9, box("person", 30))]}  # fmt: skip
    frames = [FrameTracks(i, f, 50, 40, plan[f]) for i, f in enumerate(sorted(plan))]
    info = DetectorInfo("m", "segment", {0: "person", 1: "car"})
    meta = VideoMeta("clip.mp4", 6, 10, 20, 2, 30.0)
    write_cvat_video(tmp_path / "annotations.xml", info, lambda: iter(frames), meta)
    write_mot(tmp_path, info, lambda: iter(frames), meta)

    root, tracks = read_cvat_video(tmp_path / "annotations.xml")
    assert [(t.id, t.label) for t in tracks] == [(0, "person"), (1, "car"), (2, "person")]
    mask_box = (21, 11, 25, 14)
    assert [(s.frame, s.outside) for s in tracks[0].shapes] == [
        (10, False), (12, False), (14, True), (16, False), (18, False), (20, True),
    ]  # fmt: skip
    assert {s.box for s in tracks[0].shapes} == {mask_box}
    assert [(s.frame, s.outside) for s in tracks[1].shapes] == [(f, False) for f in (12, 14, 16, 18, 20)]
    assert [(s.frame, s.outside, s.box) for s in tracks[2].shapes] == [(20, False, (30.0, 1.0, 35.0, 9.5))]
    element = root.find("track/mask")
    assert element is not None
    runs = [int(v) for v in element.attrib["rle"].split(", ")]
    decoded = cvat_rle_decode([*runs, 21, 11, 24, 13], 50, 40)
    assert np.array_equal(decoded.to_full(), mask.mask.to_full())  # type: ignore[union-attr]
    assert root.findtext("meta/task/frame_filter") == "step=2"

    labels, rows = read_mot(tmp_path)
    assert labels == ["person", "car"]
    assert [(frame, track, label) for frame, track, _, _, label in rows] == [
        (1, 1, "person"), (2, 2, "person"), (2, 1, "person"), (3, 2, "car"), (4, 2, "car"), (4, 1, "person"),
        (5, 2, "car"), (5, 1, "person"), (6, 2, "car"), (6, 3, "person"),
    ]  # fmt: skip
    assert rows[0][2] == mask_box and rows[1][2] == (1.0, 1.0, 6.0, 9.5)
    assert "frameRate=15" in (tmp_path / "seqinfo.ini").read_text()


# -- the CLI -------------------------------------------------------------------------------------------------


def test_cli_prelabels_a_video(
    pan_video: Path, fall: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    cli.add_prelabel_command(parser.add_subparsers(dest="command"), lambda model, sam: (lambda _: fall, None))

    def run(*argv: str) -> int:
        args = parser.parse_args(["prelabel", *argv, "--model", "fall", "--no-progress"])
        return args.func(args)

    out = tmp_path / "out"
    assert run(str(pan_video), "--out", str(out), "--format", "mot", "--tracker", "botsort", "--imgsz", "320",
               "--stop-frame", "11", "--frame-step", "2", "--track-buffer", "10") == 0  # fmt: skip
    printed = capsys.readouterr()
    assert printed.out.split() == [
        str(out / "gt" / "gt.txt"),
        str(out / "gt" / "labels.txt"),
        str(out / "seqinfo.ini"),
    ]
    assert "6 images labelled" in printed.err
    assert "seqLength=6" in (out / "seqinfo.ini").read_text()
    assert run(str(tmp_path), "--out", str(out), "--format", "coco", "--tracker", "bytetrack") == 2
    assert "need a video SOURCE" in capsys.readouterr().err
    assert run(str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "m"), "--format", "mot") == 2
    assert "does not exist" in capsys.readouterr().err
