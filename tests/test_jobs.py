"""Batch pre-labeling jobs: outputs against ground truth by construction (all three formats, parsed back with
ElementTree, pycocotools and plain text), failed images, progress, cancel, crash-resume byte-identity,
submit-time validation through the routes, the CLI's exit codes and resuming, and the serialisation."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pycocotools.coco import COCO

from models.base import UnknownModel
from models.detector import DetectorInfo
from models.shapes import Keypoint, RegionMask, Shape
from server.api.errors import install_error_handlers
from server.api.routes.jobs import router
from server.cli import prelabel as cli
from server.errors import ApiError
from server.formats.datasets import write_output
from server.formats.files import ImageResult
from server.formats.stored import shape_from_dict, shape_to_dict
from server.jobs.engine import LocalEngine
from server.jobs.spec import JobSpec
from server.settings import Settings
from tests.jobs_helpers import RectDetector, Scene, encode_png, make_scene, wait_for, write_dataset

# pycocotools 2.0.11 on numpy 2 warns inside annToMask about its own __array__; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
COUNT = 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Scene]]:
    directory = tmp_path_factory.mktemp("images")
    return directory, write_dataset(directory, COUNT)


@pytest.fixture(scope="module")
def corrupt_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Scene]]:
    directory = tmp_path_factory.mktemp("corrupt")
    return directory, write_dataset(directory, 6, corrupt=True)


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[Callable[..., LocalEngine]]:
    engines: list[LocalEngine] = []

    def make(detector: RectDetector | None = None, db: Path | None = None, **kwargs: object) -> LocalEngine:
        detectors = {"rects": detector or RectDetector()}
        engine = LocalEngine(
            lambda name: detectors[name], state_db=db or tmp_path / "jobs.sqlite3", readers=2, **kwargs
        )
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def spec(source: dict, out: Path, fmt: str = "cvat_images", **extra: object) -> JobSpec:
    body = {"source": source, "detector": "rects", "output": {"format": fmt, "directory": str(out)}}
    return JobSpec.model_validate(body | extra)


def truth_boxes(scene: Scene) -> list[tuple[str, float, float, float, float]]:
    return sorted((r.label, r.x0, r.y0, r.x1, r.y1) for r in scene.rects)


# -- parsing the outputs back ----------------------------------------------------------------------------


def read_cvat(path: Path) -> dict[str, dict]:
    """name → {"id", "size", "boxes": [(label, x1, y1, x2, y2)]}; masks become their box after checking that
    every pixel of it is set (the scenes' objects are solid rectangles)."""
    root = ET.parse(path).getroot()
    assert root.findtext("version") == "1.1"
    images = {}
    for image in root.iter("image"):
        boxes = []
        for box in image.iter("box"):
            a = box.attrib
            assert (a["source"], a["occluded"]) == ("auto", "0")
            boxes.append((a["label"], *(float(a[k]) for k in ("xtl", "ytl", "xbr", "ybr"))))
        for mask in image.iter("mask"):
            a = mask.attrib
            left, top, width, height = (int(a[k]) for k in ("left", "top", "width", "height"))
            runs = [int(v) for v in a["rle"].split(",")]
            assert sum(runs) == width * height
            bitmap = np.repeat(np.arange(len(runs)) % 2 == 1, runs).reshape(height, width)
            assert bitmap.all()
            boxes.append((a["label"], left, top, left + width, top + height))
        size = (int(image.attrib["width"]), int(image.attrib["height"]))
        images[image.attrib["name"]] = {"id": int(image.attrib["id"]), "size": size, "boxes": sorted(boxes)}
    return images


def read_coco(path: Path) -> dict[str, dict]:
    coco = COCO(str(path))
    images = {}
    for image_id, image in coco.imgs.items():
        boxes = []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            x, y, w, h = ann["bbox"]
            assert ann["score"] == pytest.approx(0.9)
            if ann["segmentation"]:  # a mask: exactly the rectangle's pixels
                full = np.zeros((image["height"], image["width"]), dtype=np.uint8)
                full[int(y) : int(y + h), int(x) : int(x + w)] = 1
                np.testing.assert_array_equal(coco.annToMask(ann), full)
            assert ann["area"] == pytest.approx(w * h)
            boxes.append((coco.cats[ann["category_id"]]["name"], x, y, x + w, y + h))
        size = (image["width"], image["height"])
        images[image["file_name"]] = {"id": image_id, "size": size, "boxes": sorted(boxes)}
    return images


def read_yolo(directory: Path, sizes: dict[str, tuple[int, int]]) -> dict[str, dict]:
    """Boxes from `cls cx cy w h` rows; polygon rows (masks) become the box of their pixel-centre vertices
    grown by half a pixel, which is the rectangle again."""
    names = dict(re.findall(r"^  (\d+): \"(.*)\"$", (directory / "data.yaml").read_text(), re.M))
    images = {}
    for name, (width, height) in sizes.items():
        rows = (directory / "labels" / Path(name).with_suffix(".txt")).read_text().splitlines()
        boxes = []
        for row in rows:
            cls, *values = row.split()
            v = [float(x) for x in values]
            if len(v) == 4:
                cx, cy, w, h = v[0] * width, v[1] * height, v[2] * width, v[3] * height
                boxes.append((names[cls], cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
            else:
                xs, ys = [x * width for x in v[0::2]], [y * height for y in v[1::2]]
                assert len(xs) == 4  # a rectangle's outline, simplified
                boxes.append((names[cls], min(xs) - 0.5, min(ys) - 0.5, max(xs) + 0.5, max(ys) + 0.5))
        images[name] = {"size": (width, height), "boxes": sorted(boxes)}
    return images


def assert_matches_truth(found: dict[str, dict], truth: dict[str, Scene]) -> None:
    assert sorted(found) == sorted(truth)
    for name, scene in truth.items():
        assert found[name]["size"] == (scene.width, scene.height)
        got, want = found[name]["boxes"], truth_boxes(scene)
        assert [g[0] for g in got] == [w[0] for w in want], name
        np.testing.assert_allclose([g[1:] for g in got], [w[1:] for w in want], atol=1e-3, err_msg=name)


# -- end to end ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "task"),
    [("cvat_images", "segment"), ("cvat_images", "detect"), ("coco", "segment"), ("coco", "detect"),
     ("yolo", "detect"), ("yolo", "segment")],
)  # fmt: skip
def test_directory_job_matches_ground_truth(
    dataset: tuple[Path, dict[str, Scene]],
    make_engine: Callable[..., LocalEngine],
    tmp_path: Path,
    fmt: str,
    task: str,
) -> None:
    directory, truth = dataset
    detector = RectDetector(task)
    engine = make_engine(detector)
    out = tmp_path / "out"
    status = wait_for(engine, engine.submit(spec({"directory": str(directory)}, out, fmt, batch_size=3)).id)

    assert (status.state, status.total, status.done, status.failed, status.pending) == (
        "completed",
        COUNT,
        COUNT,
        0,
        0,
    )
    assert status.error is None and status.failures == []
    assert status.started_at and status.finished_at and status.finished_at >= status.started_at
    assert status.images_per_second and status.images_per_second > 0
    assert sorted(detector.calls.values()) == [1] * COUNT  # every image exactly once
    assert max(detector.batches) == 3  # batched as asked

    if fmt == "cvat_images":
        assert status.outputs == [str(out / "annotations.xml")]
        found = read_cvat(out / "annotations.xml")
        order = sorted(truth)
        assert [found[n]["id"] for n in order] == list(range(COUNT))  # id = position in the sorted source
    elif fmt == "coco":
        found = read_coco(out / "annotations.json")
    else:
        assert status.outputs == [str(out / "data.yaml"), str(out / "labels")]
        found = read_yolo(out, {n: (s.width, s.height) for n, s in truth.items()})
    assert_matches_truth(found, truth)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # temp files renamed or removed


def test_bad_images_fail_alone_with_their_reason(
    corrupt_dataset: tuple[Path, dict[str, Scene]], make_engine: Callable[..., LocalEngine], tmp_path: Path
) -> None:
    directory, truth = corrupt_dataset
    engine = make_engine()
    status = wait_for(engine, engine.submit(spec({"directory": str(directory)}, tmp_path / "out", "coco")).id)

    assert (status.state, status.total, status.done, status.failed) == ("completed", 8, 6, 2)
    reasons = {f.image: f.error for f in status.failures}
    assert sorted(reasons) == ["broken.png", "text.jpg"]
    assert "truncated or damaged" in reasons["broken.png"]
    assert "not an image" in reasons["text.jpg"]
    assert_matches_truth(read_coco(tmp_path / "out" / "annotations.json"), truth)


def test_paths_and_urls_sources(
    dataset: tuple[Path, dict[str, Scene]], make_engine: Callable[..., LocalEngine], tmp_path: Path
) -> None:
    directory, truth = dataset
    names = sorted(truth)[:3]
    engine = make_engine(settings=Settings(url_allow_private=True))
    paths = [str(directory / n) for n in names] + [str(directory / "missing.png")]
    status = wait_for(engine, engine.submit(spec({"paths": paths}, tmp_path / "p")).id)
    assert (status.state, status.done, status.failed) == ("completed", 3, 1)
    assert "does not exist" in status.failures[0].error
    assert_matches_truth(read_cvat(tmp_path / "p" / "annotations.xml"), {n: truth[n] for n in names})

    class Files(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            path = directory / self.path.removeprefix("/data/")
            body = path.read_bytes() if path.is_file() else b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}/data"
        urls = [f"{base}/{n}" for n in names] + [f"{base}/nothing.png"]
        status = wait_for(engine, engine.submit(spec({"urls": urls}, tmp_path / "u")).id)
    finally:
        server.shutdown()
    assert (status.state, status.done, status.failed) == ("completed", 3, 1)
    assert "HTTP 404" in status.failures[0].error
    found = read_cvat(tmp_path / "u" / "annotations.xml")
    assert_matches_truth({n.removeprefix("data/"): v for n, v in found.items()}, {n: truth[n] for n in names})


def test_sam_refine_gets_bytes_and_detections(
    dataset: tuple[Path, dict[str, Scene]], make_engine: Callable[..., LocalEngine], tmp_path: Path
) -> None:
    directory, truth = dataset
    seen: list[tuple[str, int]] = []

    def refine(model: str, data: bytes, image: np.ndarray, shapes: list[Shape]) -> list[Shape]:
        assert data == encode_png(image)  # the same image, as bytes and decoded
        seen.append((model, len(shapes)))
        return [*shapes, Shape("tag", label="refined")]

    engine = make_engine(RectDetector("detect"), refine=refine, check_refine=lambda name: {"sam_x": 1}[name])
    out = tmp_path / "out"
    with pytest.raises(ApiError) as unknown:
        engine.submit(spec({"directory": str(directory)}, out, sam_refine="sam_y"))
    assert (unknown.value.status, unknown.value.code) == (404, "unknown_model")
    status = wait_for(engine, engine.submit(spec({"directory": str(directory)}, out, sam_refine="sam_x")).id)
    assert status.state == "completed"
    assert sorted(seen) == sorted(("sam_x", len(s.rects)) for s in truth.values())
    root = ET.parse(out / "annotations.xml").getroot()
    assert [t.attrib["label"] for t in root.iter("tag")] == ["refined"] * COUNT


def test_finished_jobs_past_retention_are_deleted_at_start_and_at_submit(
    dataset: tuple[Path, dict[str, Scene]], make_engine: Callable[..., LocalEngine], tmp_path: Path
) -> None:
    directory, _ = dataset
    db = tmp_path / "jobs.sqlite3"
    settings = Settings(job_retention_days=1)
    engine = make_engine(db=db, settings=settings)
    old, recent = (
        wait_for(engine, engine.submit(spec({"directory": str(directory)}, tmp_path / name)).id).id
        for name in ("old", "recent")
    )
    with sqlite3.connect(db) as connection:  # `old` finished two days ago
        connection.execute("UPDATE jobs SET finished = finished - 2 * 86400 WHERE id = ?", (old,))
    engine.close()

    restarted = make_engine(db=db, settings=settings)
    assert [job.id for job in restarted.list()] == [recent]
    with pytest.raises(ApiError) as gone:
        restarted.status(old)
    assert gone.value.code == "unknown_job"
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT COUNT(*) FROM items WHERE job_id = ?", (old,)).fetchone() == (0,)
        assert connection.execute("SELECT COUNT(*) FROM items WHERE job_id = ?", (recent,)).fetchone()[0] > 0
        connection.execute("UPDATE jobs SET finished = finished - 2 * 86400 WHERE id = ?", (recent,))
    restarted.submit(spec({"directory": str(directory)}, tmp_path / "new"))  # a submission purges too
    assert recent not in [job.id for job in restarted.list()]
    assert (tmp_path / "old" / "annotations.xml").exists()  # output files are the user's: never deleted


def test_retention_zero_keeps_every_job(
    dataset: tuple[Path, dict[str, Scene]], make_engine: Callable[..., LocalEngine], tmp_path: Path
) -> None:
    directory, _ = dataset
    db = tmp_path / "jobs.sqlite3"
    engine = make_engine(db=db, settings=Settings(job_retention_days=0))
    job = wait_for(engine, engine.submit(spec({"directory": str(directory)}, tmp_path / "out")).id).id
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE jobs SET finished = finished - 3650 * 86400 WHERE id = ?", (job,))
    engine.close()
    assert [j.id for j in make_engine(db=db, settings=Settings(job_retention_days=0)).list()] == [job]


# -- progress and cancel ---------------------------------------------------------------------------------


def test_progress_then_cancel_stops_promptly(
    dataset: tuple[Path, dict[str, Scene]], make_engine: Callable[..., LocalEngine], tmp_path: Path
) -> None:
    directory, _ = dataset
    detector = RectDetector(delay=0.1)
    engine = make_engine(detector)
    job = engine.submit(spec({"directory": str(directory)}, tmp_path / "out", batch_size=1))
    assert job.state in ("queued", "running") and job.total == COUNT

    deadline = time.monotonic() + 20
    while (status := engine.status(job.id)).done < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert status.state == "running"
    assert status.done + status.failed + status.pending == status.total
    assert status.images_per_second and 2 < status.images_per_second < 20  # ~10/s with a 0.1 s detector
    assert status.eta_seconds == pytest.approx(status.pending / status.images_per_second, rel=0.05, abs=0.2)

    cancelled = engine.cancel(job.id)
    assert cancelled.state == "cancelled" and cancelled.finished_at
    time.sleep(0.3)  # at most the batch in flight finishes
    calls = sum(detector.calls.values())
    time.sleep(0.4)
    assert sum(detector.calls.values()) == calls < COUNT
    final = engine.status(job.id)
    assert final.state == "cancelled" and final.done < COUNT and final.outputs == []
    assert not (tmp_path / "out" / "annotations.xml").exists()
    with pytest.raises(ApiError) as again:
        engine.cancel(job.id)
    assert (again.value.status, again.value.code) == (409, "job_finished")


# -- crash and resume ------------------------------------------------------------------------------------


def test_kill_9_then_resume_redoes_nothing_and_output_is_byte_identical(
    tmp_path: Path, make_engine: Callable[..., LocalEngine]
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    truth = write_dataset(images, 24)
    scene_of = {n: int(re.search(r"scene_(\d+)", n).group(1)) for n in truth}  # type: ignore[union-attr]
    db, log = tmp_path / "crash.sqlite3", tmp_path / "calls.log"
    crash_spec = spec({"directory": str(images)}, tmp_path / "resumed", batch_size=2)

    worker = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "jobs_crash_worker.py"), str(db), crash_spec.model_dump_json(),
         str(log), "0.15"],
        stdout=subprocess.PIPE, cwd=ROOT, text=True,
    )  # fmt: skip
    try:
        assert worker.stdout is not None
        job_id = worker.stdout.readline().strip()
        assert job_id, "the worker did not start the job"
        deadline = time.monotonic() + 30
        with sqlite3.connect(db) as reader:
            while reader.execute("SELECT done FROM jobs WHERE id = ?", (job_id,)).fetchone()[0] < 6:
                assert time.monotonic() < deadline and worker.poll() is None
                time.sleep(0.02)
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(10)
            state = reader.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
            rows = reader.execute("SELECT name FROM items WHERE job_id = ? AND status = 'done'", (job_id,))
            done_at_kill = {scene_of[name] for (name,) in rows}
    finally:
        if worker.poll() is None:
            worker.kill()
    assert state == "running"  # it died mid-job
    assert 6 <= len(done_at_kill) < 24
    assert done_at_kill <= {int(line) for line in log.read_text().split()}

    detector = RectDetector()
    engine = make_engine(detector, db=db)
    assert engine.resume_unfinished() == [job_id]
    resumed = wait_for(engine, job_id)
    assert (resumed.state, resumed.done, resumed.failed) == ("completed", 24, 0)
    assert not set(detector.calls) & done_at_kill  # no finished item was redone
    assert set(detector.calls) | done_at_kill == set(range(24))
    assert set(detector.calls.values()) == {1}

    fresh = make_engine(RectDetector(), db=tmp_path / "fresh.sqlite3")
    straight = spec({"directory": str(images)}, tmp_path / "straight", batch_size=2)
    assert wait_for(fresh, fresh.submit(straight).id).state == "completed"
    resumed_xml = (tmp_path / "resumed" / "annotations.xml").read_bytes()
    assert resumed_xml == (tmp_path / "straight" / "annotations.xml").read_bytes()
    assert_matches_truth(read_cvat(tmp_path / "resumed" / "annotations.xml"), truth)


# -- the HTTP routes: submit-time validation -------------------------------------------------------------


@pytest.fixture
def client(make_engine: Callable[..., LocalEngine]) -> Iterator[TestClient]:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.jobs = make_engine()
    with TestClient(app) as test_client:
        yield test_client


def body(source: dict, out: Path, fmt: str = "cvat_images", **extra: object) -> dict:
    return {"source": source, "detector": "rects", "output": {"format": fmt, "directory": str(out)}} | extra


def error_of(response: object) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]  # type: ignore[attr-defined]


def test_routes_run_list_and_refuse_to_cancel_a_finished_job(
    client: TestClient, dataset: tuple[Path, dict[str, Scene]], tmp_path: Path
) -> None:
    directory, _ = dataset
    created = client.post("/v1/jobs", json=body({"directory": str(directory)}, tmp_path / "out", "yolo"))
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["total"] == COUNT and job["spec"]["batch_size"] == 8 and job["spec"]["params"]["conf"] == 0.25

    deadline = time.monotonic() + 20
    while (status := client.get(f"/v1/jobs/{job['id']}").json())["state"] != "completed":
        assert time.monotonic() < deadline and status["state"] in ("queued", "running")
        time.sleep(0.02)
    assert status["done"] == COUNT and status["pending"] == 0 and status["eta_seconds"] is None
    assert [j["id"] for j in client.get("/v1/jobs").json()["jobs"]] == [job["id"]]
    assert client.get("/v1/jobs", params={"state": "running"}).json()["jobs"] == []

    refused = client.delete(f"/v1/jobs/{job['id']}")
    assert error_of(refused) == (409, "job_finished")
    assert "already completed" in refused.json()["error"]["message"]


def test_routes_validate_at_submit(
    client: TestClient, dataset: tuple[Path, dict[str, Scene]], tmp_path: Path
) -> None:
    directory, _ = dataset
    good = {"directory": str(directory)}
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    cases = [
        (body({"directory": str(tmp_path / "missing")}, tmp_path / "o"), (400, "source_not_found")),
        (body({"directory": str(tmp_path / "empty")}, tmp_path / "o"), (400, "source_empty")),
        (body(good, tmp_path / "a_file" / "out"), (400, "output_not_writable")),
        (body(good, tmp_path / "o") | {"detector": "nope"}, (404, "unknown_model")),
        (body(good, tmp_path / "o", params={"classes": [7]}), (422, "unknown_class")),
        (body(good, tmp_path / "o", sam_refine="mobile_sam"), (422, "refine_unavailable")),
        (body(good | {"paths": ["x.png"]}, tmp_path / "o"), (422, "invalid_request")),
        (body(good, tmp_path / "o", "pascal_voc"), (422, "invalid_request")),
        (body(good, tmp_path / "o", batch_size=0), (422, "invalid_request")),
        (body({"urls": ["ftp://host/a.png"]}, tmp_path / "o"), (400, "unsupported_url")),
    ]
    for payload, expected in cases:
        assert error_of(client.post("/v1/jobs", json=payload)) == expected, payload
    assert client.get("/v1/jobs").json()["jobs"] == []  # nothing was stored
    assert error_of(client.get("/v1/jobs/nope")) == (404, "unknown_job")
    assert error_of(client.delete("/v1/jobs/nope")) == (404, "unknown_job")


# -- CLI -------------------------------------------------------------------------------------------------


def runtime_of(detector: RectDetector) -> cli.Runtime:
    """What the main CLI passes: the detector lookup (unknown names refused) and no SAM refinement."""

    def lookup(name: str) -> RectDetector:
        if name != "rects":
            raise UnknownModel(f"unknown model {name!r}")
        return detector

    return lambda model, sam_refine: (lookup, None)


def run_cli(argv: list[str], detector: RectDetector | None = None) -> int:
    parser = argparse.ArgumentParser()
    cli.add_prelabel_command(parser.add_subparsers(dest="command"), runtime_of(detector or RectDetector()))
    args = parser.parse_args(["prelabel", *argv])
    return args.func(args)


def test_cli_exit_codes(
    dataset: tuple[Path, dict[str, Scene]],
    corrupt_dataset: tuple[Path, dict[str, Scene]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    directory, truth = dataset
    common = ["--model", "rects", "--format", "coco", "--no-progress"]
    assert run_cli([str(directory), "--out", str(tmp_path / "ok"), *common]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "ok" / "annotations.json")]
    assert_matches_truth(read_coco(tmp_path / "ok" / "annotations.json"), truth)

    assert run_cli([str(corrupt_dataset[0]), "--out", str(tmp_path / "bad"), *common]) == 1
    assert "failed: broken.png" in capsys.readouterr().err

    assert run_cli([str(tmp_path / "missing"), "--out", str(tmp_path / "m"), *common]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run_cli([str(directory), "--out", str(tmp_path / "u"), *common[2:], "--model", "nope"]) == 2
    assert run_cli([str(directory), "--out", str(tmp_path / "c"), *common, "--classes", "x"]) == 2
    assert run_cli([str(directory), "--out", str(tmp_path / "b"), *common, "--batch-size", "0"]) == 2
    with pytest.raises(SystemExit) as usage:
        run_cli([str(directory), "--out", str(tmp_path / "f"), "--model", "rects", "--format", "voc"])
    assert usage.value.code == 2


def test_cli_rerun_resumes_the_unfinished_job(dataset: tuple[Path, dict[str, Scene]], tmp_path: Path) -> None:
    directory, truth = dataset
    out = tmp_path / "out"
    argv = [str(directory), "--model", "rects", "--out", str(out), "--format", "yolo", "--batch-size", "2"]
    second = RectDetector()
    parser = argparse.ArgumentParser()
    cli.add_prelabel_command(parser.add_subparsers(), runtime_of(second))
    job_spec = cli.build_spec(parser.parse_args(["prelabel", *argv]))

    # A first run, interrupted after a few batches (engine.close() is what Ctrl-C does in the command).
    first = RectDetector(delay=0.05)
    engine = LocalEngine(lambda _: first, state_db=out / cli.STATE_DB_NAME, readers=2)
    job_id = engine.submit(job_spec).id
    wait_for(engine, job_id, states=("running",))
    while engine.status(job_id).done < 4:
        time.sleep(0.01)
    engine.close()
    done_before = set(first.calls)  # the batch in flight finished and was recorded before closing

    args = parser.parse_args(["prelabel", *argv, "--no-progress"])
    assert args.func(args) == 0
    assert not set(second.calls) & done_before and len(set(second.calls) | done_before) == COUNT
    check = LocalEngine(lambda _: second, state_db=out / cli.STATE_DB_NAME)
    try:
        assert [j.id for j in check.list()] == [job_id]  # resumed, not started over
    finally:
        check.close()
    assert_matches_truth(read_yolo(out, {n: (s.width, s.height) for n, s in truth.items()}), truth)


# -- writers and serialisation ---------------------------------------------------------------------------


def every_kind(width: int = 50, height: int = 40) -> list[Shape]:
    bitmap = np.zeros((6, 7), dtype=bool)
    bitmap[1:5, 2:6] = True
    bitmap[2, 3] = False  # a hole
    return [
        Shape("box", label="car", score=np.float32(0.75), box=(np.float32(1.5), 2, 10, 20.25)),  # type: ignore[arg-type]
        Shape("rotated_box", label="car", box=(10.0, 10.0, 30.0, 20.0), rotation=30.0),
        Shape("polygon", label="lane", polygon=[1.0, 1.0, 20.0, 1.0, 20.0, 10.0], attributes={"kind": "x"}),
        Shape("mask", label="car", score=0.5, mask=RegionMask(bitmap, 20, 30, width, height)),
        Shape("mask", label="car", mask=RegionMask.empty(width, height)),
        Shape(
            "keypoints",
            label="person",
            score=0.8,
            keypoints=[
                Keypoint("a", 5.0, 6.0),
                Keypoint("b", 7.5, 8.0, visible=False, score=0.1),
                Keypoint("c", 9.0, 30.0),
            ],
        ),  # fmt: skip
        Shape("tag", label="daytime", score=0.99),
    ]


def test_serde_round_trips_every_kind() -> None:
    for shape in every_kind():
        stored = json.loads(json.dumps(shape_to_dict(shape)))
        assert shape_from_dict(stored) == shape, shape.kind
    mask = every_kind()[3]
    assert shape_to_dict(mask)["mask"]["cvat"][-4:] == [22, 31, 25, 34]  # tight inclusive box


def test_writers_every_shape_kind(tmp_path: Path) -> None:
    info = DetectorInfo("m", "detect", {0: "car", 1: "person"}, ("a", "b", "c"), ((0, 1), (1, 2)))
    results = [ImageResult(0, "img.png", 50, 40, every_kind()), ImageResult(2, "two.png", 50, 40, [])]
    for fmt in ("cvat_images", "coco", "yolo"):
        write_output(fmt, tmp_path, info, lambda: iter(results))

    root = ET.parse(tmp_path / "annotations.xml").getroot()
    labels = [
        (label.findtext("name"), label.findtext("type"), label.findtext("parent"))
        for label in root.iter("label")
    ]
    assert labels == [("car", "any", None), ("person", "skeleton", None), ("a", "points", "person"),
                      ("b", "points", "person"), ("c", "points", "person"), ("lane", "any", None),
                      ("daytime", "any", None)]  # fmt: skip
    image = root.find("image")
    assert image is not None and [i.attrib["id"] for i in root.iter("image")] == ["0", "2"]
    assert [e.tag for e in image] == [
        "box",
        "box",
        "polygon",
        "mask",
        "skeleton",
        "tag",
    ]  # empty mask left out
    assert image[1].attrib["rotation"] == "30.00" and "rotation" not in image[0].attrib
    assert image[2].attrib["points"] == "1.00,1.00;20.00,1.00;20.00,10.00"
    assert image[2].find("attribute").attrib == {"name": "kind"} and image[2].findtext("attribute") == "x"
    mask = image[3].attrib
    assert (mask["left"], mask["top"], mask["width"], mask["height"], mask["rle"]) == (
        "22", "31", "4", "4", "0, 5, 1, 10",
    )  # fmt: skip
    points = [(p.attrib["label"], p.attrib["outside"], p.attrib["points"]) for p in image[4]]
    assert points == [("a", "0", "5.00,6.00"), ("b", "1", "7.50,8.00"), ("c", "0", "9.00,30.00")]

    coco = COCO(str(tmp_path / "annotations.json"))
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    assert anns[0]["bbox"] == [1.5, 2, 8.5, 18.25] and anns[0]["segmentation"] == []
    rotated = anns[1]
    xs, ys = rotated["segmentation"][0][0::2], rotated["segmentation"][0][1::2]
    assert [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)] == pytest.approx(
        rotated["bbox"], abs=0.02
    )
    assert rotated["area"] == 200 and anns[2]["area"] == pytest.approx(85.5)
    assert coco.annToMask(anns[3]).sum() == 15 and anns[3]["area"] == 15
    person = coco.loadCats([2])[0]
    assert person["keypoints"] == ["a", "b", "c"] and person["skeleton"] == [[1, 2], [2, 3]]
    assert anns[4]["keypoints"] == [5.0, 6.0, 2, 0, 0, 0, 9.0, 30.0, 2] and anns[4]["num_keypoints"] == 2
    assert len(anns) == 5  # no empty mask, no tag
    assert [c["name"] for c in coco.dataset["categories"]] == ["car", "person", "lane"]

    rows = [r.split() for r in (tmp_path / "labels" / "img.txt").read_text().splitlines()]
    assert [len(r) for r in rows] == [5, 9, 7, 9]  # box, obb corners, polygon, mask outline; no pose, no tag
    assert rows[0] == ["0", f"{5.75 / 50:.6f}", f"{11.125 / 40:.6f}", f"{8.5 / 50:.6f}", f"{18.25 / 40:.6f}"]
    assert rows[2][0] == "2" and all(0 <= float(v) <= 1 for r in rows for v in r[1:])
    assert (tmp_path / "labels" / "two.txt").read_text() == ""
    assert 'names:\n  0: "car"\n  1: "person"\n  2: "lane"\n' in (tmp_path / "data.yaml").read_text()

    pose = DetectorInfo("p", "pose", {0: "person"}, ("a", "b", "c"))
    write_output("yolo", tmp_path / "pose", pose, lambda: iter(results))
    (row,) = [r.split() for r in (tmp_path / "pose" / "labels" / "img.txt").read_text().splitlines()]
    box = [(5 + 9) / 2 / 50, (6 + 30) / 2 / 40, 4 / 50, 24 / 40]  # around the visible points
    assert row[0] == "0" and [float(v) for v in row[1:5]] == pytest.approx(box, abs=1e-6)
    assert row[5:] == [
        f"{5 / 50:.6f}",
        f"{6 / 40:.6f}",
        "2",
        "0",
        "0",
        "0",
        f"{9 / 50:.6f}",
        f"{30 / 40:.6f}",
        "2",
    ]
    assert "kpt_shape: [3, 3]" in (tmp_path / "pose" / "data.yaml").read_text()


def test_duplicate_output_names_are_refused(make_engine: Callable[..., LocalEngine], tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "a.jpg"):
        (images / name).write_bytes(encode_png(make_scene(0)[0]))
    engine = make_engine()
    assert wait_for(engine, engine.submit(spec({"directory": str(images)}, tmp_path / "c")).id).done == 2
    with pytest.raises(ApiError) as clash:
        engine.submit(spec({"directory": str(images)}, tmp_path / "y", "yolo"))
    assert (clash.value.status, clash.value.code) == (400, "duplicate_names")


def test_cli_with_other_settings_supersedes_the_unfinished_job(
    dataset: tuple[Path, dict[str, Scene]], tmp_path: Path
) -> None:
    directory, _ = dataset
    out = tmp_path / "out"
    argv = [str(directory), "--model", "rects", "--out", str(out), "--format", "coco", "--no-progress"]
    parser = argparse.ArgumentParser()
    cli.add_prelabel_command(parser.add_subparsers(), runtime_of(RectDetector()))
    old_spec = cli.build_spec(parser.parse_args(["prelabel", *argv, "--conf", "0.5"]))
    engine = LocalEngine(lambda _: RectDetector(delay=0.05), state_db=out / cli.STATE_DB_NAME, readers=2)
    old = engine.submit(old_spec).id
    wait_for(engine, old, states=("running",))
    engine.close()

    args = parser.parse_args(["prelabel", *argv])
    assert args.func(args) == 0
    check = LocalEngine(lambda _: RectDetector(), state_db=out / cli.STATE_DB_NAME)
    try:
        jobs = {j.id: (j.state, j.spec.params.conf) for j in check.list()}
    finally:
        check.close()
    assert jobs.pop(old) == ("cancelled", 0.5)
    assert list(jobs.values()) == [("completed", 0.25)]
