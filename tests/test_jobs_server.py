"""Jobs as users run them: a real detector in a `labelserve serve` process, killed with SIGKILL mid-job and
restarted; the job resumes and its output equals an uninterrupted run's, byte for byte."""

from __future__ import annotations

import io
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from .conftest import fall_checkpoint, ultralytics_asset
from .server_process import ServerProcess

IMAGES = 24


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Distinct real photos (crops, flips and scales of bus.jpg and zidane.jpg) plus one corrupt file."""
    directory = tmp_path_factory.mktemp("photos")
    sources = [Image.open(ultralytics_asset(n)).convert("RGB") for n in ("bus.jpg", "zidane.jpg")]
    for i in range(IMAGES):
        image = sources[i % 2]
        w, h = image.size
        crop = image.crop((i * 7 % 60, i * 5 % 40, w - i * 3 % 50, h - i * 11 % 45))
        crop = ImageOps.mirror(crop) if i % 3 == 0 else crop
        crop = crop.resize((int(crop.width * (0.6 + 0.03 * i)), int(crop.height * (0.6 + 0.03 * i))))
        crop.save(directory / f"img_{i:03d}.jpg", quality=90)
    (directory / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return directory


class Server(ServerProcess):
    def __init__(self, data_dir: Path, weights: Path) -> None:
        env = {
            "LABELSERVE_DATA_DIR": str(data_dir),
            "LABELSERVE_WEIGHTS_DIR": str(weights),
            "LABELSERVE_MODELS": "",
            "LABELSERVE_DETECTOR_PATHS": json.dumps({"fall": str(fall_checkpoint())}),
            # A video job commits after every batch, so that a kill lands mid-job however fast the host is.
            "LABELSERVE_JOB_CHECKPOINT_S": "0",
        }
        data_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(env, data_dir.parent / f"{data_dir.name}-{time.monotonic_ns()}.log")

    def wait(self, job_id: str, until, timeout: float = 240, poll: float = 0.2) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.http.get(f"/v1/jobs/{job_id}").json()
            if until(status):
                return status
            time.sleep(poll)
        raise TimeoutError(status)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    started: list[Server] = []

    def start(data_dir: Path) -> Server:
        started.append(Server(data_dir, tmp_path / "weights"))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def job(photos: Path, out: Path) -> dict:
    return {"source": {"directory": str(photos)}, "detector": "fall",
            "output": {"format": "coco", "directory": str(out)}, "batch_size": 4}  # fmt: skip


def test_kill_9_mid_job_then_restart_resumes_with_identical_output(
    photos: Path, tmp_path: Path, server_factory
):
    reference = server_factory(tmp_path / "data-ref")
    ref_id = reference.http.post("/v1/jobs", json=job(photos, tmp_path / "ref")).json()["id"]
    done = reference.wait(ref_id, lambda s: s["state"] in ("completed", "failed"))
    assert done["state"] == "completed" and done["done"] == IMAGES and done["failed"] == 1
    assert "broken.jpg" in json.dumps(done["failures"])
    coco = json.loads((tmp_path / "ref" / "annotations.json").read_text())
    assert len(coco["images"]) == IMAGES and len(coco["annotations"]) >= IMAGES  # people in every photo
    reference.stop()

    first = server_factory(tmp_path / "data")
    job_id = first.http.post("/v1/jobs", json=job(photos, tmp_path / "out")).json()["id"]
    first.wait(job_id, lambda s: s["done"] >= 6)
    first.stop(signal.SIGKILL)  # no shutdown hook runs

    second = server_factory(tmp_path / "data")
    resumed = second.wait(job_id, lambda s: s["state"] in ("completed", "failed"))
    assert resumed["state"] == "completed" and resumed["done"] == IMAGES and resumed["failed"] == 1
    output = (tmp_path / "out" / "annotations.json").read_bytes()
    assert output == (tmp_path / "ref" / "annotations.json").read_bytes()


def test_detections_in_job_output_equal_the_detect_endpoint(photos: Path, tmp_path: Path, server_factory):
    server = server_factory(tmp_path / "data")
    job_id = server.http.post("/v1/jobs", json=job(photos, tmp_path / "out")).json()["id"]
    server.wait(job_id, lambda s: s["state"] == "completed")
    coco = json.loads((tmp_path / "out" / "annotations.json").read_text())
    by_image = {image["file_name"]: image["id"] for image in coco["images"]}
    name = "img_004.jpg"
    expected = server.http.post("/v1/detect/fall", files={"file": (name, (photos / name).read_bytes())},
                                data={"params": "{}"}).json()["shapes"]  # fmt: skip
    found = [a for a in coco["annotations"] if a["image_id"] == by_image[name]]
    assert len(found) == len(expected) > 0
    for annotation, shape in zip(sorted(found, key=lambda a: -a["score"]), expected, strict=True):
        x1, y1, x2, y2 = shape["box"]
        assert annotation["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.01)
    assert Image.open(io.BytesIO((photos / name).read_bytes())).size[0] > 0
