"""The corrections report (issue #16, part 3) against the CVAT emulator, through the real cvat-sdk: a task is
pre-labelled by a job, then a "reviewer" edits, relabels, deletes and adds annotations with cvat-sdk as
CVAT's UI would (an edited auto shape comes back as semi-auto), so every count is known by construction."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cvat_sdk import models
from cvat_sdk.core.client import AccessTokenCredentials, Client
from cvat_sdk.core.proxies.annotations import AnnotationUpdateAction
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.api.errors import install_error_handlers
from server.api.routes.jobs import corrections_router, router
from server.cli.cvat_webhook import add_cvat_commands
from server.cvat.annotations import TaskObject
from server.jobs.engine import LocalEngine
from server.services.corrections import count_corrections
from server.settings import Settings
from tests.cvat_emulator import CvatEmulator, EmulatedTask
from tests.jobs_helpers import RectDetector, Scene, wait_for, write_dataset

TOKEN = "good-token"
COUNT = 12
LABELS = [{"name": "red", "type": "rectangle"}, {"name": "green"}, {"name": "blue"}]


@pytest.fixture
def cvat() -> Iterator[CvatEmulator]:
    with CvatEmulator(token=TOKEN) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Scene]]:
    directory = tmp_path_factory.mktemp("images")
    return directory, write_dataset(directory, COUNT)


@pytest.fixture
def http(tmp_path: Path) -> Iterator[TestClient]:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(corrections_router)
    detector = RectDetector("detect")
    app.state.jobs = LocalEngine(
        lambda name: {"rects": detector}[name],
        state_db=tmp_path / "jobs.sqlite3",
        readers=0,
        settings=Settings(cvat_upload_chunk=4, cvat_timeout_s=10),
    )
    with TestClient(app) as client:
        yield client
    app.state.jobs.close()


def connection(cvat: CvatEmulator, task: EmulatedTask) -> dict[str, Any]:
    return {"url": cvat.url, "task_id": task.id, "token": TOKEN}


def prelabel(client: TestClient, cvat: CvatEmulator, task: EmulatedTask, directory: Path) -> str:
    spec = {
        "source": {"directory": str(directory)},
        "detector": "rects",
        "output": {"cvat_task": connection(cvat, task)},
    }
    created = client.post("/v1/jobs", json=spec)
    assert created.status_code == 201, created.text
    status = wait_for(client.app.state.jobs, created.json()["id"])
    assert status.state == "completed", status.error
    return status.id


def frames(directory: Path, names: list[str]) -> list[tuple[str, bytes]]:
    return [(name, (directory / name).read_bytes()) for name in names]


def review(cvat: CvatEmulator, task: EmulatedTask) -> dict[str, Counter[str]]:
    """Act on the pre-labels as reviewers would, through cvat-sdk; the counts this must give, per class."""
    names = {label["id"]: label["name"] for label in task.labels}
    ids = {label["name"]: label["id"] for label in task.labels}
    expected: dict[str, Counter[str]] = {name: Counter() for name in names.values()}
    with Client(cvat.url, check_server_version=False) as client:
        client.login(AccessTokenCredentials(TOKEN))
        proxy = client.tasks.retrieve(task.id)
        shapes = sorted(proxy.get_annotations().shapes, key=lambda s: s.id)
        assert len(shapes) >= 12 and all(s.source == "auto" for s in shapes)
        edits, deletions = [], []
        for i, shape in enumerate(shapes):
            label = names[shape.label_id]
            request = models.LabeledShapeRequest(**shape.to_dict())
            action = i % 5
            if action == 1:  # moved a corner: cvat-core turns the source into semi-auto
                request.points = [shape.points[0] + 2, *shape.points[1:]]
                request.source = "semi-auto"
                edits.append(request)
                expected[label]["edited"] += 1
            elif action == 2 and label != "red":  # another label (red is a rectangle-only label: skip it)
                request.label_id = ids["blue" if label == "green" else "green"]
                request.source = "semi-auto"
                edits.append(request)
                expected[label]["edited"] += 1
                expected[label]["relabelled"] += 1
            elif action == 3:
                deletions.append(shape.id)
                expected[label]["deleted"] += 1
            else:
                expected[label]["accepted"] += 1
        assert edits and deletions and sum(c["relabelled"] for c in expected.values()) > 0
        proxy.update_annotations(
            models.PatchedLabeledDataRequest(shapes=edits), action=AnnotationUpdateAction.UPDATE
        )
        proxy.remove_annotations(ids=deletions)

        def shape(label: str, source: str, frame: int) -> models.LabeledShapeRequest:
            box = [1.0 + frame, 2.0, 11.0 + frame, 12.0]
            return models.LabeledShapeRequest(
                type="rectangle", frame=frame, label_id=ids[label], points=box, source=source
            )

        added = [
            shape("blue", "manual", 0), shape("blue", "manual", 3), shape("blue", "manual", 5),
            shape("green", "manual", 1), shape("green", "manual", 2),
            shape("red", "semi-auto", 4),  # drawn with an AI tool (SAM clicks): the model missed it too
            shape("green", "file", 6),  # imported from a file
            shape("red", "auto", 7),  # another model's run
        ]  # fmt: skip
        proxy.update_annotations(
            models.PatchedLabeledDataRequest(shapes=added), action=AnnotationUpdateAction.CREATE
        )
    for label, count in (("blue", 3), ("green", 2), ("red", 1)):
        expected[label]["missed"] += count
    expected["green"]["other"] += 1
    expected["red"]["other"] += 1
    return expected


def rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["label"]: row for row in [*report["classes"], report["total"]]}


def test_counts_match_what_reviewers_did(
    cvat: CvatEmulator, dataset: tuple[Path, dict[str, Scene]], http: TestClient, tmp_path: Path
) -> None:
    directory, truth = dataset
    task = cvat.add_task(LABELS, frames(directory, sorted(truth)))
    job_id = prelabel(http, cvat, task, directory)
    uploaded = Counter(label for scene in truth.values() for label in (r.label for r in scene.rects))
    expected = review(cvat, task)

    body = {"task": connection(cvat, task), "prelabel_job": job_id}
    answer = http.post("/v1/corrections", json=body)
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["deletions_known"] is True and report["prelabel_job"] == job_id
    got = rows(report)
    assert [row["label"] for row in report["classes"]] == ["red", "green", "blue"]
    total: Counter[str] = Counter()
    for label, want in expected.items():
        row = got[label]
        for column in ("accepted", "edited", "relabelled", "deleted", "missed", "other"):
            assert row[column] == want[column], (label, column)
        # Every pre-label of the class is accepted, edited or deleted: nothing is lost or counted twice.
        assert row["accepted"] + row["edited"] + row["deleted"] == uploaded[label]
        assert row["acceptance_rate"] == round(want["accepted"] / uploaded[label], 4)
        total.update(want)
    assert {k: got["total"][k] for k in total} == dict(total)

    as_csv = http.post("/v1/corrections", params={"format": "csv"}, json=body)
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
    parsed = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [r["label"] for r in parsed] == ["red", "green", "blue", "total"]
    assert all(r[k] == str(got[r["label"]][k]) for r in parsed for k in ("accepted", "deleted", "missed"))

    # Without the job, CVAT's sources alone: deletions unknown, AI-tool shapes count as edits, other
    # models' auto shapes as accepted.
    alone = http.post("/v1/corrections", json={"task": connection(cvat, task)}).json()
    assert alone["deletions_known"] is False and "upper bound" in alone["note"]
    by_source = Counter(
        (label["name"], s["source"])
        for s in task.annotations["shapes"]
        for label in task.labels
        if label["id"] == s["label_id"]
    )
    for label, row in rows(alone).items():
        if label == "total":
            continue
        assert row["deleted"] is None
        assert row["accepted"] == by_source[label, "auto"]
        assert row["edited"] == by_source[label, "semi-auto"]
        assert row["missed"] == by_source[label, "manual"]
        assert row["other"] == by_source[label, "file"]
    assert rows(alone)["total"]["deleted"] is None


def test_bad_requests_say_what_to_do(
    cvat: CvatEmulator, dataset: tuple[Path, dict[str, Scene]], http: TestClient, tmp_path: Path
) -> None:
    directory, truth = dataset
    names = sorted(truth)
    task = cvat.add_task(LABELS, frames(directory, names))
    other = cvat.add_task(LABELS, frames(directory, names))

    def error(body: dict[str, Any]) -> tuple[int, str, str]:
        answer = http.post("/v1/corrections", json=body)
        found = answer.json()["error"]
        return answer.status_code, found["code"], found["message"]

    status, code, message = error({"task": connection(cvat, task)})
    assert (status, code) == (400, "no_prelabels") and "Pre-label it first" in message

    job_id = prelabel(http, cvat, task, directory)
    assert error({"task": connection(cvat, task), "prelabel_job": "nope"})[:2] == (404, "unknown_job")
    status, code, message = error({"task": connection(cvat, other), "prelabel_job": job_id})
    assert (status, code) == (400, "wrong_task") and f"task {task.id}" in message

    files = http.post(
        "/v1/jobs",
        json={
            "source": {"directory": str(directory)},
            "detector": "rects",
            "output": {"format": "coco", "directory": str(tmp_path / "coco")},
        },
    ).json()["id"]
    assert wait_for(http.app.state.jobs, files).state == "completed"
    assert error({"task": connection(cvat, task), "prelabel_job": files})[:2] == (400, "not_a_cvat_upload")

    assert error({"task": {"url": cvat.url, "task_id": task.id, "token": "bad"}})[:2] == (
        400,
        "cvat_auth_failed",
    )
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:  # a job from before the ids were recorded
        db.execute("DELETE FROM uploaded WHERE job_id = ?", (job_id,))
    status, code, message = error({"task": connection(cvat, task), "prelabel_job": job_id})
    assert (status, code) == (409, "upload_unrecorded") and "leave out prelabel_job" in message


def test_cli_reports_with_the_prelabel_state_database(
    cvat: CvatEmulator, dataset: tuple[Path, dict[str, Scene]], http: TestClient, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    directory, truth = dataset
    task = cvat.add_task(LABELS, frames(directory, sorted(truth)))
    job_id = prelabel(http, cvat, task, directory)
    review(cvat, task)
    expected = http.post(
        "/v1/corrections", json={"task": connection(cvat, task), "prelabel_job": job_id}
    ).json()

    def run(*argv: str) -> int:
        parser = argparse.ArgumentParser()
        add_cvat_commands(parser.add_subparsers())
        args = parser.parse_args(["cvat", "corrections", "--cvat-task", f"{cvat.url}/tasks/{task.id}", *argv])
        return args.func(args)

    for name in ("CVAT_USER", "CVAT_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CVAT_ACCESS_TOKEN", TOKEN)
    db = str(tmp_path / "jobs.sqlite3")
    assert run("--state-db", db) == 0  # the newest job that uploaded into the task: job_id
    assert json.loads(capsys.readouterr().out) == expected
    assert run("--state-db", db, "--job", job_id, "--csv") == 0
    assert (
        capsys.readouterr().out.splitlines()[0]
        == "label,accepted,edited,relabelled,deleted,missed,other,acceptance_rate"
    )
    assert run() == 0
    assert json.loads(capsys.readouterr().out)["deletions_known"] is False
    assert run("--job", job_id) == 2 and "--job needs --state-db" in capsys.readouterr().err
    monkeypatch.setenv("CVAT_ACCESS_TOKEN", "bad")
    assert run() == 1 and "refused the credentials" in capsys.readouterr().err


def test_counting_rules_on_their_own() -> None:
    """An uploaded id edited twice stays one edit; an id not uploaded never counts as accepted when the
    uploads are known; a label the task no longer has gets a row of its own."""
    objects = [
        TaskObject("shape", 1, 10, 0, "auto"),
        TaskObject("shape", 2, 11, 0, "semi-auto"),
        TaskObject("tag", 3, 10, 1, "auto"),
        TaskObject("shape", 4, 10, 1, "auto"),  # another run's
        TaskObject("track", 5, 11, 0, "manual"),
    ]
    uploaded = {("shape", 1): 10, ("shape", 2): 10, ("tag", 3): 10, ("shape", 9): 12}
    counted = count_corrections(objects, {10: "car", 11: "bus"}, uploaded)
    got = {
        c.label: (c.accepted, c.edited, c.relabelled, c.deleted, c.missed, c.other) for c in counted.classes
    }
    assert got == {"car": (2, 1, 1, 0, 0, 1), "bus": (0, 0, 0, 0, 1, 0), "label 12": (0, 0, 0, 1, 0, 0)}
    assert counted.total.acceptance_rate == 2 / 4
