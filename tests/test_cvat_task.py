"""Jobs with a CVAT task as output (upload) or source (its frames), through the real cvat-sdk against a
loopback emulation of CVAT's REST API (tests/cvat_emulator.py): no live CVAT server was involved.

Uploads are checked against the job's own CVAT XML / COCO output for the same images and against cvat-sdk's
`_AnnotationMapper` (what `annotate_task` would upload); bad input is refused before anything runs; a
worker killed between sending a chunk and recording it, or an upload answered with an error after it was
stored, leaves no duplicate annotations."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cvat_sdk.auto_annotation.driver import _AnnotationMapper
from cvat_sdk.core.client import AccessTokenCredentials, Client
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from models.detector import Detector, DetectorInfo, DetectParams
from models.shapes import Keypoint, Shape
from server.api.errors import install_error_handlers
from server.api.routes.jobs import router
from server.cli import prelabel as cli
from server.cvat.agent_functions import cvat_annotation, label_spec
from server.errors import ApiError
from server.formats.api_json import render_shape
from server.formats.stored import shape_from_dict
from server.jobs import cvat_upload
from server.jobs.engine import LocalEngine
from server.jobs.spec import JobSpec
from server.settings import Settings
from tests.cvat_emulator import CvatEmulator, EmulatedTask
from tests.jobs_helpers import (
    RectDetector,
    Scene,
    encode_png,
    make_scene,
    wait_for,
    write_dataset,
)

from .conftest import fall_checkpoint, ultralytics_asset

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "good-token"
COUNT = 8
RECT_LABELS = [{"name": "red", "type": "mask"}, {"name": "green"}, {"name": "blue"}]


@pytest.fixture
def cvat() -> Iterator[CvatEmulator]:
    with CvatEmulator(token=TOKEN) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Scene]]:
    directory = tmp_path_factory.mktemp("images")
    return directory, write_dataset(directory, COUNT)


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[Callable[..., LocalEngine]]:
    engines: list[LocalEngine] = []

    def make(detector: Detector | None = None, db: Path | None = None, **settings: Any) -> LocalEngine:
        found = detector or RectDetector()
        engine = LocalEngine(
            lambda name: {"rects": found}[name],
            state_db=db or tmp_path / "jobs.sqlite3",
            readers=2,
            settings=Settings(**({"cvat_upload_chunk": 3, "cvat_timeout_s": 10} | settings)),
        )
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def frames_of(directory: Path, names: list[str], prefix: str = "") -> list[tuple[str, bytes]]:
    return [(prefix + name, (directory / name).read_bytes()) for name in names]


def job(source: dict, output: dict, **extra: Any) -> dict:
    return {"source": source, "detector": "rects", "output": output} | extra


def task_output(cvat: CvatEmulator, task: EmulatedTask, **options: Any) -> dict:
    return {"cvat_task": {"url": cvat.url, "task_id": task.id, "token": TOKEN} | options}


def stored(task: EmulatedTask) -> list[tuple]:
    """The task's automatic annotations with label names instead of ids, comparable across tasks."""
    names = {label["id"]: label["name"] for label in task.labels}
    names |= {s["id"]: s["name"] for label in task.labels for s in label["sublabels"]}
    found: list[tuple] = [("tag", t["frame"], names[t["label_id"]]) for t in task.annotations["tags"]]
    for s in task.annotations["shapes"]:
        if s["source"] != "auto":
            continue
        elements = tuple(
            sorted((names[e["label_id"]], tuple(e["points"]), e["outside"]) for e in s["elements"])
        )
        found.append(
            (s["type"], s["frame"], names[s["label_id"]], tuple(s["points"]), s["rotation"], elements)
        )
    return sorted(found, key=repr)


def ledger(engine: LocalEngine, job_id: str) -> list[tuple[str, int, int, int]]:
    """What the job recorded as uploaded: (kind, CVAT id, label id, frame), sorted."""
    return sorted((a.kind, a.cvat_id, a.label_id, a.frame) for a in engine.store.uploaded(job_id))


def auto_ids(task: EmulatedTask) -> list[tuple[str, int, int, int]]:
    return sorted(
        (kind[:-1], a["id"], a["label_id"], a["frame"])
        for kind in ("tags", "shapes")
        for a in task.annotations[kind]
        if a["source"] == "auto"
    )


# -- output: the upload equals the job's own files and cvat-sdk's own mapping -------------------------------


def read_xml(path: Path) -> dict[str, list[tuple]]:
    """name → [(type, label, CVAT points)] from CVAT for images 1.1, masks as RLE + inclusive box."""
    found: dict[str, list[tuple]] = {}
    for image in ET.parse(path).getroot().iter("image"):
        shapes = []
        for box in image.iter("box"):
            a = box.attrib
            shapes.append(("rectangle", a["label"], tuple(float(a[k]) for k in ("xtl", "ytl", "xbr", "ybr"))))
        for mask in image.iter("mask"):
            a = mask.attrib
            left, top, width, height = (int(a[k]) for k in ("left", "top", "width", "height"))
            runs = [float(v) for v in a["rle"].split(",")]
            shapes.append(("mask", a["label"], (*runs, left, top, left + width - 1, top + height - 1)))
        found[image.attrib["name"]] = sorted(shapes)
    return found


def mapper_expectation(
    engine: LocalEngine,
    job_id: str,
    info: DetectorInfo,
    cvat: CvatEmulator,
    task_id: int,
    frame_of: dict[str, int],
) -> list[dict]:
    """What cvat-sdk's annotate_task would upload for the job's stored results: the agent conversion with
    the detector's class ids, remapped and validated by cvat-sdk's _AnnotationMapper against the task's
    labels as cvat-sdk reads them."""
    client = Client(cvat.url, check_server_version=False)
    client.login(AccessTokenCredentials(TOKEN))
    task = client.tasks.retrieve(task_id)
    keypoints = list(info.keypoint_names)
    spec = [label_spec(info.task, name, class_id, keypoints) for class_id, name in info.class_names.items()]
    mapper = _AnnotationMapper(
        logging.getLogger("test"),
        spec,
        task.get_labels(),
        allow_unmatched_labels=False,
        conv_mask_to_poly=False,
    )
    ids = {name: class_id for class_id, name in info.class_names.items()}
    shapes = []
    for item in engine.store.items(job_id, status="done"):
        found = [shape_from_dict(d) for d in json.loads(item.result or "[]")]
        annotations = [cvat_annotation(render_shape(s, ("cvat",)), ids[s.label], False) for s in found]
        _, remapped = mapper.validate_and_remap(
            [a for a in annotations if a is not None], frame_of[item.name]
        )
        shapes += [s.to_dict() for s in remapped]
    client.close()
    return shapes


@pytest.mark.parametrize("task", ["segment", "detect"])
def test_upload_equals_the_xml_output_and_cvat_sdks_mapping(
    cvat: CvatEmulator, dataset: tuple[Path, dict[str, Scene]], make_engine: Callable[..., LocalEngine],
    tmp_path: Path, task: str,
) -> None:  # fmt: skip
    directory, truth = dataset
    names = sorted(truth)
    # Frame names need not be the job's: "sub/scene_003.png" finds "uploads/sub/scene_003.png" by file name.
    labels = RECT_LABELS if task == "segment" else [{"name": "red", "type": "rectangle"}, *RECT_LABELS[1:]]
    target = cvat.add_task(labels, frames_of(directory, names, prefix="uploads/"))
    detector = RectDetector(task)
    engine = make_engine(detector)
    output = {"format": "cvat_images", "directory": str(tmp_path / "out")} | task_output(cvat, target)
    status = wait_for(
        engine, engine.submit(JobSpec.model_validate(job({"directory": str(directory)}, output))).id
    )
    assert status.state == "completed", status.error

    frame_of = {name: index for index, name in enumerate(names)}
    uploaded: dict[int, list[tuple]] = {}
    labels = {label["id"]: label["name"] for label in target.labels}
    for shape in target.annotations["shapes"]:
        assert shape["source"] == "auto" and shape["frame"] in frame_of.values()
        uploaded.setdefault(shape["frame"], []).append(
            (shape["type"], labels[shape["label_id"]], tuple(shape["points"]))
        )
    xml = read_xml(tmp_path / "out" / "annotations.xml")
    assert sum(len(s) for s in xml.values()) == len(target.annotations["shapes"]) > COUNT
    for name in names:
        assert sorted(uploaded.get(frame_of[name], [])) == xml[name], name

    expected = mapper_expectation(engine, status.id, detector.info, cvat, target.id, frame_of)
    keys = ("type", "label_id", "frame", "points", "source")
    got = [{k: s[k] for k in keys} for s in target.annotations["shapes"]]
    assert sorted(map(repr, got)) == sorted(repr({k: e[k] for k in keys}) for e in expected)

    patches = cvat.calls("PATCH", "/annotations/")
    assert len(patches) > 1 and all(
        len(p.body["shapes"]) >= 3 or p is patches[-1] for p in patches
    )  # chunks of 3
    assert status.cvat_upload is not None and status.cvat_upload.uploaded_images == COUNT
    assert status.cvat_upload.shapes == len(got) and status.cvat_upload.skipped == 0
    assert status.outputs[-1] == f"{cvat.url}/tasks/{target.id}"
    assert ledger(engine, status.id) == auto_ids(target)


def test_credentials_are_redacted_in_the_spec_and_forgotten_when_done(
    cvat: CvatEmulator, dataset: tuple[Path, dict[str, Scene]], make_engine: Callable[..., LocalEngine],
    tmp_path: Path,
) -> None:  # fmt: skip
    directory, truth = dataset
    target = cvat.add_task(RECT_LABELS, frames_of(directory, sorted(truth)))
    engine = make_engine(RectDetector(delay=0.2))
    body = job({"directory": str(directory)}, task_output(cvat, target), batch_size=2)
    submitted = engine.submit(JobSpec.model_validate(body))
    db = sqlite3.connect(engine.store.path)
    (spec_text,) = db.execute("SELECT spec FROM jobs").fetchone()
    assert TOKEN not in spec_text and '"token":"**********"' in spec_text
    assert TOKEN in db.execute("SELECT secrets FROM job_secrets").fetchone()[0]  # kept to resume
    assert TOKEN not in submitted.model_dump_json() and TOKEN not in engine.list()[0].model_dump_json()
    assert wait_for(engine, submitted.id).state == "completed"
    assert db.execute("SELECT COUNT(*) FROM job_secrets").fetchone()[0] == 0
    db.close()

    profiles = {"main": {"url": cvat.url, "token": TOKEN}}
    engine = make_engine(db=tmp_path / "profile.sqlite3", cvat_profiles=profiles)
    output = {"cvat_task": {"profile": "main", "task_id": target.id, "clear_existing": True}}
    status = wait_for(
        engine, engine.submit(JobSpec.model_validate(job({"directory": str(directory)}, output))).id
    )
    assert status.state == "completed" and status.outputs == [f"{cvat.url}/tasks/{target.id}"]
    assert engine.store.secrets(status.id) is None  # nothing secret was ever stored


def test_real_detector_upload_matches_its_coco_output(cvat: CvatEmulator, tmp_path: Path) -> None:
    from models.registry import ModelRegistry

    images = tmp_path / "photos"
    images.mkdir()
    for name in ("bus.jpg", "zidane.jpg"):
        photo = Image.open(ultralytics_asset(name)).convert("RGB")
        photo.save(images / name, quality=92)
        photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(images / f"flipped_{name}", quality=92)
    names = sorted(p.name for p in images.iterdir())
    settings = Settings(models=[], detector_paths={"fall": fall_checkpoint()}, weights_dir=tmp_path / "w",
                        data_dir=tmp_path / "data")  # fmt: skip
    registry = ModelRegistry(settings)
    registry.load_enabled()
    target = cvat.add_task(
        [{"name": "person", "type": "rectangle"}, {"name": "Fall"}], frames_of(images, names)
    )
    engine = LocalEngine(registry.detector, state_db=tmp_path / "jobs.sqlite3", readers=0, settings=settings)
    try:
        output = {"format": "coco", "directory": str(tmp_path / "out")}
        output |= task_output(cvat, target, label_map={"Normal": "person"})
        spec = JobSpec.model_validate(
            {"source": {"directory": str(images)}, "detector": "fall", "output": output}
        )
        status = wait_for(engine, engine.submit(spec).id)
    finally:
        engine.close()
    assert status.state == "completed", status.error

    coco = json.loads((tmp_path / "out" / "annotations.json").read_text())
    categories = {c["id"]: c["name"] for c in coco["categories"]}
    image_names = {image["id"]: image["file_name"] for image in coco["images"]}
    label_ids = {label["name"]: label["id"] for label in target.labels}
    expected: dict[tuple[int, int], list[list[float]]] = {}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        label = {"Normal": "person"}.get(categories[ann["category_id"]], categories[ann["category_id"]])
        key = (names.index(image_names[ann["image_id"]]), label_ids[label])
        expected.setdefault(key, []).append([x, y, x + w, y + h])
    uploaded: dict[tuple[int, int], list[list[float]]] = {}
    for shape in target.annotations["shapes"]:
        assert shape["type"] == "rectangle" and shape["source"] == "auto"
        uploaded.setdefault((shape["frame"], shape["label_id"]), []).append(shape["points"])
    assert len(coco["annotations"]) >= 6 and sorted(uploaded) == sorted(expected)  # people in every photo
    for key, boxes in expected.items():
        flat = [v for box in sorted(boxes) for v in box]
        assert [v for box in sorted(uploaded[key]) for v in box] == pytest.approx(flat, abs=0.02), key


# -- refused before anything runs ---------------------------------------------------------------------------


@pytest.fixture
def http(make_engine: Callable[..., LocalEngine]) -> Iterator[tuple[TestClient, RectDetector]]:
    detector = RectDetector()
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.jobs = make_engine(
        detector, cvat_profiles={"main": {"url": "http://127.0.0.1:9", "token": "t"}}
    )
    with TestClient(app) as client:
        yield client, detector


def error_of(response: Any) -> tuple[int, str, str]:
    error = response.json()["error"]
    return response.status_code, error["code"], error["message"]


def test_label_mismatch_is_refused_before_any_image_and_label_map_fixes_it(
    cvat: CvatEmulator, dataset: tuple[Path, dict[str, Scene]], http: tuple[TestClient, RectDetector]
) -> None:
    client, detector = http
    directory, truth = dataset
    target = cvat.add_task(
        [{"name": "Red", "type": "mask"}, {"name": "green"}], frames_of(directory, sorted(truth))
    )
    source = {"directory": str(directory)}
    status, code, message = error_of(client.post("/v1/jobs", json=job(source, task_output(cvat, target))))
    assert (status, code) == (422, "label_mapping")
    assert "'red', 'blue'" in message and "'Red', 'green'" in message  # case-sensitive, like CVAT
    assert "label_map" in message and "allow_unmatched" in message

    wrong_type = task_output(cvat, target, label_map={"red": "Red", "blue": "Red"})
    target.labels[1]["type"] = "rectangle"
    status, code, message = error_of(client.post("/v1/jobs", json=job(source, wrong_type)))
    assert (status, code) == (422, "label_mapping") and "'green' is a rectangle label" in message
    assert client.get("/v1/jobs").json()["jobs"] == [] and not detector.calls
    assert not cvat.calls("PATCH") and not cvat.calls("PUT")  # nothing processed, nothing uploaded

    target.labels[1]["type"] = "any"
    fixed = task_output(cvat, target, label_map={"red": "Red", "blue": None})
    created = client.post("/v1/jobs", json=job(source, fixed))
    assert created.status_code == 201, created.text
    done = wait_for(http[0].app.state.jobs, created.json()["id"])
    assert done.state == "completed" and done.cvat_upload is not None
    blue = sum(1 for scene in truth.values() for rect in scene.rects if rect.label == "blue")
    assert done.cvat_upload.skipped == blue > 0
    assert {s["label_id"] for s in target.annotations["shapes"]} == {label["id"] for label in target.labels}


def test_connection_problems_are_clear_4xx(
    cvat: CvatEmulator, dataset: tuple[Path, dict[str, Scene]], http: tuple[TestClient, RectDetector]
) -> None:
    client, detector = http
    directory, truth = dataset
    target = cvat.add_task(RECT_LABELS, frames_of(directory, sorted(truth)))
    source = {"directory": str(directory)}
    login = {"url": cvat.url, "task_id": target.id}
    cases = [
        (login | {"token": "wrong"}, (400, "cvat_auth_failed"), "refused the credentials"),
        (login | {"username": "alice", "password": "wrong"}, (400, "cvat_auth_failed"), "logging in"),
        (login | {"token": TOKEN, "task_id": 999}, (400, "cvat_task_not_found"), "has no task 999"),
        (login | {"token": TOKEN, "url": "http://127.0.0.1:9"}, (400, "cvat_unreachable"), "Cannot reach"),
        (login | {"token": TOKEN, "url": "ftp://cvat"}, (400, "cvat_unreachable"), "not a CVAT address"),
        ({"profile": "nope", "task_id": target.id}, (400, "cvat_profile"), "has: main"),
        ({"profile": "main", "url": cvat.url, "task_id": 1}, (400, "cvat_profile"), "leave out url"),
        (login | {"token": TOKEN, "username": "alice"}, (422, "invalid_request"), "exactly one of"),
        ({"task_id": target.id}, (422, "invalid_request"), "exactly one of"),
    ]
    for task, expected, words in cases:
        status, code, message = error_of(client.post("/v1/jobs", json=job(source, {"cvat_task": task})))
        assert (status, code) == expected and words in message, (task, message)
        assert TOKEN not in message
    orphan = job(
        source, {"cvat_task": {"clear_existing": True}}
    )  # no task, and no CVAT source to take it from
    assert error_of(client.post("/v1/jobs", json=orphan))[:2] == (422, "invalid_request")
    assert client.get("/v1/jobs").json()["jobs"] == [] and not detector.calls
    assert not cvat.calls("PATCH") and not cvat.calls("PUT")


def test_images_without_a_frame_are_refused_with_their_names(
    cvat: CvatEmulator, dataset: tuple[Path, dict[str, Scene]], http: tuple[TestClient, RectDetector]
) -> None:
    client, detector = http
    directory, truth = dataset
    names = sorted(truth)
    frames = frames_of(directory, names[2:]) + [("a/scene_000.png", b""), ("b/scene_000.png", b"")]
    target = cvat.add_task(RECT_LABELS, [(n, d or (directory / names[0]).read_bytes()) for n, d in frames])
    response = client.post("/v1/jobs", json=job({"directory": str(directory)}, task_output(cvat, target)))
    status, code, message = error_of(response)
    assert (status, code) == (400, "unmatched_frames")
    assert message.startswith("2 images have no frame") and "'scene_000.png', 'scene_001.png'" in message
    assert client.get("/v1/jobs").json()["jobs"] == [] and not detector.calls


# -- a CVAT task as the source ------------------------------------------------------------------------------


def test_cvat_task_source_end_to_end(
    cvat: CvatEmulator, make_engine: Callable[..., LocalEngine], tmp_path: Path
) -> None:
    scenes = {f"frames/f{i}.png": make_scene(i) for i in range(6)}
    labels = [{"name": "red"}, {"name": "green"}, {"name": "blue", "type": "rectangle"}]
    target = cvat.add_task(labels, [(n, encode_png(image)) for n, (image, _) in scenes.items()], deleted={4})
    manual = {"type": "rectangle", "frame": 0, "label_id": target.labels[1]["id"], "points": [1, 1, 5, 5]}
    target.annotations["shapes"].append(
        {**manual, "id": 1, "source": "manual", "elements": [], "rotation": 0.0}
    )
    engine = make_engine(RectDetector("detect"))
    body = job(
        {"cvat_task": {"url": cvat.url, "task_id": target.id, "username": "alice", "password": "wonderland"}},
        {"format": "coco", "directory": str(tmp_path / "out"), "cvat_task": {"clear_existing": True}},
    )
    spec = JobSpec.model_validate(body)
    assert spec.output.cvat_task is not None and spec.output.cvat_task.task_id == target.id  # the source task
    status = wait_for(engine, engine.submit(spec).id)
    assert (status.state, status.total, status.done) == ("completed", 5, 5), status.error

    frames_read = sorted(
        int(r.query["number"][0]) for r in cvat.calls("GET", "/data/") if "number" in r.query
    )
    assert frames_read == [0, 1, 2, 3, 5]  # each frame once, the deleted one not at all
    coco = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert [image["file_name"] for image in coco["images"]] == [n for i, n in enumerate(scenes) if i != 4]
    expected = []
    for index, (_, rects) in enumerate(scenes.values()):
        if index != 4:
            expected += [("rectangle", index, r.label, (r.x0, r.y0, r.x1, r.y1), 0.0, ()) for r in rects]
    expected = [(*e[:3], tuple(map(float, e[3])), *e[4:]) for e in expected]
    assert stored(target) == sorted(expected, key=repr)  # the manual box was replaced (clear_existing)
    assert len(cvat.calls("PUT")) == 1


def test_video_task_frames_are_named_as_cvat_exports_them(
    cvat: CvatEmulator, make_engine: Callable[..., LocalEngine], tmp_path: Path
) -> None:
    scenes = [make_scene(i) for i in range(4)]
    frames = [
        (f"clip.mp4#{i}", encode_png(image[:48, :64])) for i, (image, _) in enumerate(scenes)
    ]  # one size
    labels = [{"name": "red"}, {"name": "green"}, {"name": "blue"}]
    target = cvat.add_task(labels, frames, video=True)
    engine = make_engine(RectDetector("detect"))
    source = {"cvat_task": {"url": cvat.url, "task_id": target.id, "token": TOKEN}}
    output = {"format": "coco", "directory": str(tmp_path / "out"), "cvat_task": {}}
    status = wait_for(engine, engine.submit(JobSpec.model_validate(job(source, output))).id)
    assert status.state == "completed", status.error
    coco = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert [image["file_name"] for image in coco["images"]] == [f"frame_{i:06d}" for i in range(4)]
    assert {s["frame"] for s in target.annotations["shapes"]} <= {0, 1, 2, 3}
    assert len(target.annotations["shapes"]) == len(coco["annotations"]) > 0


# -- exactly once -------------------------------------------------------------------------------------------


def reference(
    cvat: CvatEmulator, directory: Path, names: list[str], engine: LocalEngine, **options: Any
) -> list:
    """The annotations an uninterrupted run uploads into a fresh task with the same frames."""
    task = cvat.add_task(RECT_LABELS, frames_of(directory, names))
    output = task_output(cvat, task, **options)
    status = wait_for(
        engine, engine.submit(JobSpec.model_validate(job({"directory": str(directory)}, output))).id
    )
    assert status.state == "completed"
    return stored(task)


@pytest.mark.parametrize(("clear_existing", "kill_at"), [(False, 2), (True, 1)])
def test_kill_9_between_sending_a_chunk_and_recording_it_duplicates_nothing(
    cvat: CvatEmulator, dataset: tuple[Path, dict[str, Scene]], make_engine: Callable[..., LocalEngine],
    tmp_path: Path, clear_existing: bool, kill_at: int,
) -> None:  # fmt: skip
    directory, truth = dataset
    names = sorted(truth)
    target = cvat.add_task(RECT_LABELS, frames_of(directory, names))
    old = {
        "type": "rectangle",
        "frame": 1,
        "label_id": target.labels[1]["id"],
        "points": [2.0, 2.0, 9.0, 9.0],
    }
    target.annotations["shapes"].append({**old, "id": 1, "source": "manual", "elements": [], "rotation": 0.0})
    db = tmp_path / "crash.sqlite3"
    spec_json = json.dumps(
        job({"directory": str(directory)}, task_output(cvat, target, clear_existing=clear_existing))
    )
    env = os.environ | {"LABELSERVE_CVAT_UPLOAD_CHUNK": "3"}
    worker = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "jobs_crash_worker.py"), str(db), spec_json,
         str(tmp_path / "log"), "0"],
        stdout=subprocess.PIPE, cwd=ROOT, text=True, env=env,
    )  # fmt: skip
    writes: list[str] = []

    def kill_the_uploader(method: str) -> None:  # stored by "CVAT", the answer never received
        writes.append(method)
        if len(writes) == kill_at:
            os.kill(worker.pid, signal.SIGKILL)
            while worker.poll() is None:
                time.sleep(0.01)

    cvat.on_write = kill_the_uploader
    try:
        assert worker.stdout is not None
        job_id = worker.stdout.readline().strip()
        deadline = time.monotonic() + 60
        while worker.poll() is None:
            assert time.monotonic() < deadline, "the worker was never killed"
            time.sleep(0.02)
        assert worker.returncode == -signal.SIGKILL and len(writes) == kill_at
    finally:
        if worker.poll() is None:
            worker.kill()
    cvat.on_write = None
    with sqlite3.connect(db) as reader:
        (state,) = reader.execute("SELECT state FROM jobs").fetchone()
        confirmed, started = reader.execute("SELECT confirmed, started FROM uploads").fetchone()
    assert state == "running" and started is not None and started > confirmed  # the chunk in flight
    before = len(cvat.requests)

    engine = make_engine(db=db)
    assert engine.resume_unfinished() == [job_id]
    status = wait_for(engine, job_id)
    assert status.state == "completed", status.error
    after = cvat.requests[before:]
    if clear_existing:  # nothing was confirmed: the PUT is sent again, whole (it replaces)
        assert [r.method for r in after if r.method in ("PUT", "PATCH")][0] == "PUT"
    else:  # the task was read back, and the chunk that landed was not sent again
        assert any(r.method == "GET" and r.path.endswith("/annotations/") for r in after)
    expected = reference(
        cvat, directory, names, make_engine(db=tmp_path / "ref.sqlite3"), clear_existing=clear_existing
    )
    assert stored(target) == expected and len(expected) > COUNT
    manual = [s for s in target.annotations["shapes"] if s["source"] == "manual"]
    assert len(manual) == (0 if clear_existing else 1)  # replaced, or kept once
    # The ids recorded for a corrections report are exactly the task's pre-labels, the chunk in flight's too.
    assert ledger(engine, job_id) == auto_ids(target)


def test_failed_answers_are_retried_then_resumed_without_duplicates(
    cvat: CvatEmulator, dataset: tuple[Path, dict[str, Scene]], http: tuple[TestClient, RectDetector],
    make_engine: Callable[..., LocalEngine], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(cvat_upload, "RETRY_WAIT_S", 0.0)
    client, _ = http
    directory, truth = dataset
    names = sorted(truth)
    target = cvat.add_task(RECT_LABELS, frames_of(directory, names))
    cvat.fail_writes_after_storing = 1  # stored, then HTTP 500: retried after reading the task back
    created = client.post("/v1/jobs", json=job({"directory": str(directory)}, task_output(cvat, target)))
    assert wait_for(client.app.state.jobs, created.json()["id"]).state == "completed"
    expected = reference(cvat, directory, names, make_engine(db=tmp_path / "ref.sqlite3"))
    assert stored(target) == expected
    assert ledger(client.app.state.jobs, created.json()["id"]) == auto_ids(target)

    again = cvat.add_task(RECT_LABELS, frames_of(directory, names))
    cvat.fail_writes = cvat_upload.ATTEMPTS  # every try of the first chunk: the job fails, results kept
    job_id = client.post(
        "/v1/jobs", json=job({"directory": str(directory)}, task_output(cvat, again))
    ).json()["id"]
    failed = wait_for(client.app.state.jobs, job_id)
    assert (
        failed.state == "failed"
        and "HTTP 503" in (failed.error or "")
        and "resume the job" in (failed.error or "")
    )
    resumed = client.post(f"/v1/jobs/{job_id}/resume")
    assert resumed.status_code == 200, resumed.text
    assert wait_for(client.app.state.jobs, job_id).state == "completed"
    assert stored(again) == expected
    assert ledger(client.app.state.jobs, job_id) == auto_ids(again)


# -- shape kinds --------------------------------------------------------------------------------------------


class PoseDetector(Detector):
    """Two skeletons per image with points a, b, c (b not visible)."""

    def __init__(self) -> None:
        self.info = DetectorInfo("rects", "pose", {0: "person"}, ("a", "b", "c"), ((0, 1), (1, 2)))

    def detect(self, images: list, params: DetectParams) -> list[list[Shape]]:
        return [
            [
                Shape("keypoints", label="person", score=0.9, keypoints=[
                    Keypoint("a", 3.0 + k, 4.0), Keypoint("b", 7.5, 8.0 + k, visible=False),
                    Keypoint("c", 9.0, 20.0),
                ])
                for k in range(2)
            ]
            for _ in images
        ]  # fmt: skip


def test_skeletons_map_points_by_name_and_pass_cvat_sdks_mapper(
    cvat: CvatEmulator, dataset: tuple[Path, dict[str, Scene]], make_engine: Callable[..., LocalEngine]
) -> None:
    directory, truth = dataset
    names = sorted(truth)[:3]
    body = [{"name": "person", "type": "skeleton", "sublabels": [{"name": n} for n in ("c", "a", "b")]}]
    target = cvat.add_task(body, frames_of(directory, names))
    detector = PoseDetector()
    engine = make_engine(detector)
    spec = JobSpec.model_validate(
        job({"paths": [str(directory / n) for n in names]}, task_output(cvat, target))
    )
    status = wait_for(engine, engine.submit(spec).id)
    assert status.state == "completed", status.error
    assert len(target.annotations["shapes"]) == 6
    expected = mapper_expectation(
        engine, status.id, detector.info, cvat, target.id, {n: i for i, n in enumerate(names)}
    )
    for shape, want in zip(target.annotations["shapes"], expected, strict=True):
        got = [(e["label_id"], e["points"], e["outside"]) for e in shape["elements"]]
        assert got == [(e["label_id"], e["points"], e.get("outside", False)) for e in want["elements"]]

    target.labels[0]["sublabels"].append({"id": 999, "name": "d", "type": "points"})
    with pytest.raises(ApiError) as missing:
        engine.submit(spec)
    assert missing.value.code == "label_mapping" and "points 'd'" in missing.value.message


def test_masks_as_polygons_with_conv_mask_to_poly(
    cvat: CvatEmulator, dataset: tuple[Path, dict[str, Scene]], make_engine: Callable[..., LocalEngine]
) -> None:
    directory, truth = dataset
    names = sorted(truth)[:4]
    labels = [{"name": "red", "type": "polygon"}, {"name": "green"}, {"name": "blue", "type": "mask"}]
    target = cvat.add_task(labels, frames_of(directory, names))
    engine = make_engine(RectDetector("segment"))
    spec = JobSpec.model_validate(
        job({"paths": [str(directory / n) for n in names]}, task_output(cvat, target))
    )
    with pytest.raises(ApiError) as refused:
        engine.submit(spec)
    assert (
        "'red' is a polygon label" in refused.value.message and "conv_mask_to_poly" in refused.value.message
    )
    output = task_output(cvat, target, conv_mask_to_poly=True, label_map={"blue": "green"})
    spec = JobSpec.model_validate(job({"paths": [str(directory / n) for n in names]}, output))
    assert wait_for(engine, engine.submit(spec).id).state == "completed"
    rects = [r for n in names for r in truth[n].rects]
    assert len(target.annotations["shapes"]) == len(rects) and {
        s["type"] for s in target.annotations["shapes"]
    } == {"polygon"}


# -- CLI ----------------------------------------------------------------------------------------------------


def run_cli(argv: list[str], detector: RectDetector) -> int:
    parser = argparse.ArgumentParser()
    runtime: cli.Runtime = lambda model, sam: ({"rects": detector}.__getitem__, None)  # noqa: E731
    cli.add_prelabel_command(parser.add_subparsers(), runtime)
    args = parser.parse_args(["prelabel", *argv])
    return args.func(args)


def test_cli_prelabels_a_cvat_task_with_credentials_from_the_environment(
    cvat: CvatEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    scenes = [make_scene(i) for i in range(4)]
    target = cvat.add_task(
        RECT_LABELS[1:], [(f"f{i}.png", encode_png(image)) for i, (image, _) in enumerate(scenes)]
    )
    for name in ("CVAT_ACCESS_TOKEN", "CVAT_USER", "CVAT_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    common = ["--model", "rects", "--cvat-task", f"{cvat.url}/tasks/{target.id}", "--no-progress",
              "--state-db", str(tmp_path / "state.sqlite3")]  # fmt: skip
    assert run_cli(common, RectDetector("detect")) == 2
    assert "CVAT_ACCESS_TOKEN" in capsys.readouterr().err

    monkeypatch.setenv("CVAT_ACCESS_TOKEN", TOKEN)
    assert run_cli(common, RectDetector("detect")) == 2
    assert "No CVAT label for the model labels 'red'" in capsys.readouterr().err

    monkeypatch.setenv("CVAT_ACCESS_TOKEN", "")
    monkeypatch.setenv("CVAT_USER", "alice")
    monkeypatch.setenv("CVAT_PASSWORD", "wonderland")
    detector = RectDetector("detect")
    assert run_cli([*common, "--label-map", "red=green"], detector) == 0
    assert capsys.readouterr().out.split() == [f"{cvat.url}/tasks/{target.id}"]
    green = target.labels[0]["id"]
    expected = sorted(
        (i, green if r.label in ("red", "green") else target.labels[1]["id"], (r.x0, r.y0, r.x1, r.y1))
        for i, (_, rects) in enumerate(scenes)
        for r in rects
    )
    got = sorted((s["frame"], s["label_id"], tuple(s["points"])) for s in target.annotations["shapes"])
    assert got == [(f, label, tuple(map(float, p))) for f, label, p in expected]
    assert sorted(detector.calls) == [0, 1, 2, 3]


def test_cli_rerun_resumes_the_cvat_job_with_fresh_credentials(
    cvat: CvatEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenes = [make_scene(i) for i in range(6)]
    target = cvat.add_task(
        RECT_LABELS, [(f"f{i}.png", encode_png(image)) for i, (image, _) in enumerate(scenes)]
    )
    monkeypatch.setenv("CVAT_ACCESS_TOKEN", TOKEN)
    state = tmp_path / "state.sqlite3"
    argv = ["--model", "rects", "--cvat-task", f"{cvat.url}#{target.id}", "--state-db", str(state),
            "--no-progress", "--batch-size", "1"]  # fmt: skip
    parser = argparse.ArgumentParser()
    cli.add_prelabel_command(parser.add_subparsers(), lambda model, sam: ({}.__getitem__, None))
    spec = cli.build_spec(parser.parse_args(["prelabel", *argv]))
    first = LocalEngine(lambda _: RectDetector(delay=0.1), state_db=state, readers=0)
    job_id = first.submit(spec).id
    while first.status(job_id).done < 2:
        time.sleep(0.01)
    first.close()  # what Ctrl-C does: the job goes back to queued
    assert not target.annotations["shapes"]

    second = RectDetector()
    assert run_cli(argv, second) == 0
    assert 0 < len(second.calls) < 6  # resumed, not started over
    check = LocalEngine(lambda _: second, state_db=state)
    try:
        assert [(j.id, j.state) for j in check.list()] == [(job_id, "completed")]
        assert check.store.secrets(job_id) is None
    finally:
        check.close()
    assert len(target.annotations["shapes"]) == sum(len(rects) for _, rects in scenes)
