"""A video job as users run it: the real fall detector in a `labelserve serve` process, killed with SIGKILL
mid-video and restarted. The job resumes from its last checkpoint (the frames committed before the kill are
not redone) with the tracker as it stood there; its output equals an uninterrupted run's, byte for byte."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from .test_jobs_server import Server, server_factory  # noqa: F401 (a fixture)
from .video_helpers import people_scene

FRAMES, BATCH = 96, 4


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "people.mp4"
    people_scene(FRAMES, scale=0.5, loop=80).write(path)
    return path


def job(clip: Path, out: Path) -> dict:
    return {"source": {"video": str(clip)}, "detector": "fall", "params": {"imgsz": 256},
            "output": {"format": "cvat_video", "directory": str(out)}, "batch_size": BATCH}  # fmt: skip


def finished(status: dict) -> bool:
    return status["state"] in ("completed", "failed")


def test_kill_9_mid_video_then_restart_resumes_with_identical_output(
    clip: Path,
    tmp_path: Path,
    server_factory,  # noqa: F811
) -> None:
    reference = server_factory(tmp_path / "data-ref")
    ref_id = reference.http.post("/v1/jobs", json=job(clip, tmp_path / "ref")).json()["id"]
    done = reference.wait(ref_id, finished)
    assert (done["state"], done["done"], done["failed"]) == ("completed", FRAMES, 0), done
    reference.stop()
    expected = (tmp_path / "ref" / "annotations.xml").read_bytes()
    assert expected.count(b"<track ") >= 3

    first: Server = server_factory(tmp_path / "data")
    created = first.http.post("/v1/jobs", json=job(clip, tmp_path / "out"))
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    seen = first.wait(job_id, lambda s: s["done"] >= 2 * BATCH or finished(s), poll=0.02)
    assert seen["state"] == "running" and seen["done"] < FRAMES, seen  # still mid-video
    first.stop(signal.SIGKILL)  # no shutdown hook runs

    second = server_factory(tmp_path / "data")
    resumed = second.wait(job_id, finished)
    assert (resumed["state"], resumed["done"], resumed["failed"]) == ("completed", FRAMES, 0), resumed
    assert (tmp_path / "out" / "annotations.xml").read_bytes() == expected

    # It went on from its checkpoint: at least the frames seen committed, at a batch boundary.
    found = re.search(rf"job {job_id}: resuming at item (\d+), after frame (\d+)", second.log.read_text())
    assert found is not None, second.log_tail()
    item, frame = int(found[1]), int(found[2])
    assert seen["done"] <= item < FRAMES and item % BATCH == 0 and frame == item - 1
