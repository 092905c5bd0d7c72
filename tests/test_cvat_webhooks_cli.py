"""`labelserve cvat webhook register` through the real cvat-sdk against the CVAT emulator
(tests/cvat_emulator.py), and the emulator's webhooks: what it stores, and the deliveries a target receives
(signed like CVAT's send_webhook) when a job changes, a task is created or a webhook is pinged."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cvat_sdk.core.client import AccessTokenCredentials, Client
from PIL import Image

from server.cli import main
from tests.cvat_emulator import CvatEmulator

TOKEN = "good-token"
SECRET = "whsec-0123456789"
SERVER = "https://labelserve.test:8443/"  # only stored by CVAT: nothing is delivered there


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A webhook target on 127.0.0.1 that records each delivery and answers `status`."""

    url: str
    received: list[Received] = field(default_factory=list)
    status: int = 200


@pytest.fixture
def cvat() -> Iterator[CvatEmulator]:
    with CvatEmulator(token=TOKEN) as emulator:
        yield emulator


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    target = Receiver("")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            target.received.append(Received(self.path, dict(self.headers), body))
            reply = b'{"accepted": true}'
            self.send_response(target.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    target.url = f"http://127.0.0.1:{server.server_port}"
    yield target
    server.shutdown()
    server.server_close()


def profiles(monkeypatch: pytest.MonkeyPatch, **named: dict[str, Any]) -> None:
    monkeypatch.setenv("LABELSERVE_CVAT_PROFILES", json.dumps(named))


def register(*args: str) -> int:
    return main(["cvat", "webhook", "register", *args])


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), "red").save(buffer, "PNG")
    return buffer.getvalue()


def signature(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def sdk(cvat: CvatEmulator) -> Client:
    client = Client(cvat.url, check_server_version=False)
    client.login(AccessTokenCredentials(TOKEN))
    return client


def post(cvat: CvatEmulator, path: str, body: Any, org: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    if org is not None:
        headers["X-Organization"] = org
    request = urllib.request.Request(cvat.url + path, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# -- the command -------------------------------------------------------------------------------------------


def test_register_project_webhook(
    cvat: CvatEmulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    profiles(monkeypatch, main={"url": cvat.url, "token": TOKEN, "webhook_secret": SECRET})
    project = cvat.add_project("street scenes")

    assert register("--profile", "main", "--project", str(project), "--target-url", SERVER) == 0

    out, err = capsys.readouterr()
    printed = json.loads(out)
    (webhook,) = cvat.webhooks.values()
    assert printed == {
        "id": webhook.id,
        "target_url": "https://labelserve.test:8443/v1/cvat/webhooks/main",
        "events": ["update:job"],
        "type": "project",
        "project_id": project,
    }
    assert (webhook.target_url, webhook.type, webhook.project_id) == (
        printed["target_url"],
        "project",
        project,
    )
    assert webhook.events == ["update:job"] and webhook.secret == SECRET
    assert (webhook.content_type, webhook.is_active, webhook.enable_ssl) == ("application/json", True, True)
    assert webhook.description == "labelserve: warm embeddings for jobs that start"
    assert webhook.organization is None
    assert SECRET not in out + err
    (created,) = cvat.calls("POST", "/api/webhooks")
    assert created.body["secret"] == SECRET  # sent to CVAT, never answered back
    assert SECRET not in str(sdk(cvat).api_client.webhooks_api.retrieve(webhook.id)[0].to_dict())


def test_register_organization_webhook(
    cvat: CvatEmulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cvat.users["bob"] = "builder"
    profiles(
        monkeypatch,
        lab={"url": cvat.url, "username": "bob", "password": "builder", "webhook_secret": SECRET},
    )

    code = register(
        "--profile", "lab", "--org", "acme", "--target-url", "https://labelserve.test",
        "--events", "update:job, create:task", "--no-verify-ssl",
    )  # fmt: skip

    out, err = capsys.readouterr()
    assert code == 0, err
    (webhook,) = cvat.webhooks.values()
    assert json.loads(out) == {
        "id": webhook.id,
        "target_url": "https://labelserve.test/v1/cvat/webhooks/lab",
        "events": ["create:task", "update:job"],  # CVAT answers them sorted
        "type": "organization",
        "organization": "acme",
    }
    assert (webhook.type, webhook.organization, webhook.project_id) == ("organization", "acme", None)
    assert webhook.events == ["update:job", "create:task"] and webhook.secret == SECRET
    assert webhook.enable_ssl is False
    assert SECRET not in out + err


def test_unknown_profile(
    cvat: CvatEmulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    profiles(
        monkeypatch,
        main={"url": cvat.url, "token": TOKEN, "webhook_secret": SECRET},
        backup={"url": cvat.url, "token": TOKEN},
    )

    assert register("--profile", "nope", "--project", "1", "--target-url", SERVER) == 2

    err = capsys.readouterr().err
    assert "no CVAT profile 'nope'" in err and "backup, main" in err
    assert cvat.requests == [] and cvat.webhooks == {}


def test_profile_without_secret(
    cvat: CvatEmulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    profiles(monkeypatch, main={"url": cvat.url, "token": TOKEN})

    assert register("--profile", "main", "--project", "1", "--target-url", SERVER) == 2

    err = capsys.readouterr().err
    assert "no webhook_secret" in err and "LABELSERVE_CVAT_PROFILES" in err
    assert cvat.requests == []


def test_unknown_project(
    cvat: CvatEmulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    profiles(monkeypatch, main={"url": cvat.url, "token": TOKEN, "webhook_secret": SECRET})

    assert register("--profile", "main", "--project", "999", "--target-url", SERVER) == 1

    out, err = capsys.readouterr()
    assert out == ""
    assert "answered HTTP 400 while creating the webhook" in err
    assert "Project 999 does not exist" in err
    assert cvat.webhooks == {}


def test_refused_credentials_and_unknown_event(
    cvat: CvatEmulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project = cvat.add_project("p")
    profiles(
        monkeypatch,
        bad={"url": cvat.url, "token": "wrong", "webhook_secret": SECRET},
        main={"url": cvat.url, "token": TOKEN, "webhook_secret": SECRET},
    )

    assert register("--profile", "bad", "--project", str(project), "--target-url", SERVER) == 1
    assert "refused the credentials" in capsys.readouterr().err

    code = register(
        "--profile", "main", "--project", str(project), "--target-url", SERVER, "--events", "ping"
    )
    assert code == 2
    assert "--events" in capsys.readouterr().err and cvat.webhooks == {}


# -- the emulator's deliveries -----------------------------------------------------------------------------


def test_update_job_delivers_a_signed_event(
    cvat: CvatEmulator,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    profiles(monkeypatch, main={"url": cvat.url, "token": TOKEN, "webhook_secret": SECRET})
    project = cvat.add_project("p")
    assert register("--profile", "main", "--project", str(project), "--target-url", receiver.url) == 0
    webhook_id = json.loads(capsys.readouterr().out)["id"]
    frames = [(f"img/{i}.png", png()) for i in range(5)]
    task = cvat.add_task([{"name": "car"}], frames, project_id=project, segment_size=2)
    other = cvat.add_task([{"name": "car"}], frames)  # no project: nothing watches it
    assert [(j.start_frame, j.stop_frame) for j in task.jobs] == [(0, 1), (2, 3), (4, 4)]
    assert receiver.received == []  # create:task is not among the webhook's events

    (delivery,) = cvat.update_job(task.jobs[1].id, assignee="bob", state="in progress")

    (got,) = receiver.received
    assert got.path == "/v1/cvat/webhooks/main"
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["X-Signature-256"] == signature(got.body)
    payload = got.json()
    assert got.body == json.dumps(payload).encode()  # json.dumps' default separators, as CVAT sends it
    assert payload["event"] == "update:job" and payload["webhook_id"] == webhook_id
    assert payload["sender"]["username"] == "alice"
    assert payload["before_update"] == {"assignee": None, "state": "new"}
    job = payload["job"]
    assert (job["id"], job["task_id"], job["project_id"]) == (task.jobs[1].id, task.id, project)
    assert (job["start_frame"], job["stop_frame"], job["frame_count"]) == (2, 3, 2)
    assert (job["assignee"]["username"], job["state"], job["stage"]) == ("bob", "in progress", "annotation")
    assert (delivery.status_code, delivery.event, delivery.target_url) == (
        200,
        "update:job",
        receiver.url + "/v1/cvat/webhooks/main",
    )
    assert delivery.response == '{"accepted": true}' and cvat.deliveries == [delivery]

    # The job as cvat-sdk reads it is the job of the payload.
    read = sdk(cvat).jobs.retrieve(task.jobs[1].id)
    assert (read.assignee.username, read.state, read.start_frame, read.stop_frame) == (
        "bob",
        "in progress",
        2,
        3,
    )

    # A new stage starts the job over (CVAT's rule); the deprecated status follows the stage.
    cvat.update_job(task.jobs[1].id, stage="validation")
    assert receiver.received[-1].json()["before_update"] == {
        "stage": "annotation",
        "status": "annotation",
        "state": "in progress",
    }
    assert cvat.update_job(task.jobs[1].id, assignee="bob") == []  # nothing changed: no event
    cvat.update_job(other.jobs[0].id, state="completed")
    assert len(receiver.received) == 2 and len(cvat.deliveries) == 2
    receiver.status = 401
    cvat.update_job(task.jobs[0].id, assignee=None, state="rejected")
    assert cvat.deliveries[-1].status_code == 401
    webhook = sdk(cvat).api_client.webhooks_api.retrieve(webhook_id)[0]
    assert webhook.last_status == 401


def test_organization_webhook_gets_create_task(cvat: CvatEmulator, receiver: Receiver) -> None:
    status, created = post(
        cvat,
        "/api/webhooks",
        {"target_url": receiver.url + "/hook", "type": "organization", "events": ["create:task"]},
        org="acme",
    )
    assert status == 201 and created["organization"] is not None and "secret" not in created

    task = cvat.add_task([{"name": "car"}], [("a.png", png())], organization="acme")
    cvat.add_task([{"name": "car"}], [("a.png", png())], organization="other")
    project = cvat.add_project("in acme", organization="acme")
    in_project = cvat.add_task([{"name": "car"}], [("a.png", png())], project_id=project)

    assert [r.json()["task"]["id"] for r in receiver.received] == [task.id, in_project.id]
    first = receiver.received[0]
    assert first.json()["event"] == "create:task" and "X-Signature-256" not in first.headers  # no secret
    assert first.json()["task"]["organization"] == created["organization"]


def test_ping_and_raw_deliveries(cvat: CvatEmulator, receiver: Receiver) -> None:
    project = cvat.add_project("p")
    client = sdk(cvat)
    status, created = post(
        cvat,
        "/api/webhooks",
        {
            "target_url": receiver.url,
            "type": "project",
            "project_id": project,
            "events": ["update:job"],
            "secret": SECRET,
        },
    )
    assert status == 201

    delivery = client.api_client.webhooks_api.create_ping(created["id"])[0]

    assert (delivery.event, delivery.status_code, delivery.webhook_id) == ("ping", 200, created["id"])
    (got,) = receiver.received
    assert got.headers["X-Signature-256"] == signature(got.body)
    ping = got.json()
    assert ping["event"] == "ping" and ping["webhook"]["id"] == created["id"]
    assert "secret" not in ping["webhook"] and SECRET.encode() not in got.body

    # Raw deliveries: a repeat, a bad signature, no signature, bytes sent as they are.
    body = {"event": "update:job", "job": {"id": 1}, "before_update": {"state": "new"}, "webhook_id": 1}
    cvat.deliver(created["id"], body)
    cvat.deliver(created["id"], body)
    cvat.deliver(created["id"], body, signature="sha256=" + "0" * 64)
    cvat.deliver(created["id"], body, signature=None)
    cvat.deliver(created["id"], b"not json")
    sent = receiver.received[1:]
    assert sent[0].body == sent[1].body and sent[0].headers["X-Signature-256"] == signature(sent[0].body)
    assert sent[2].headers["X-Signature-256"] == "sha256=" + "0" * 64
    assert "X-Signature-256" not in sent[3].headers
    assert sent[4].body == b"not json" and sent[4].headers["X-Signature-256"] == signature(b"not json")
    assert [d.event for d in cvat.deliveries] == ["ping", *["update:job"] * 4, ""]


def test_webhooks_api(cvat: CvatEmulator) -> None:
    project = cvat.add_project("p")
    hook = {"target_url": "http://127.0.0.1:9/x", "type": "project", "project_id": project}

    assert post(cvat, "/api/webhooks", {**hook, "events": ["ping"]}) == (
        400,
        {"events": ['"ping" is not a valid choice.']},
    )
    status, errors = post(cvat, "/api/webhooks", {**hook, "events": ["create:project"]})
    assert status == 400 and "events" in errors  # a project webhook only takes events inside a project
    status, errors = post(cvat, "/api/webhooks", {**hook, "project_id": 77, "events": ["update:job"]})
    assert status == 400 and errors == {"project_id": ["Project 77 does not exist."]}
    status, errors = post(cvat, "/api/webhooks", {**hook, "type": "organization", "events": ["update:job"]})
    assert status == 400 and "type" in errors  # an organization webhook needs an organization context
    assert post(cvat, "/api/webhooks", {"type": "project"})[0] == 400
    assert cvat.webhooks == {}

    ids = [post(cvat, "/api/webhooks", {**hook, "events": ["update:job"]})[1]["id"] for _ in range(3)]
    api = sdk(cvat).api_client.webhooks_api
    listed = api.list()[0]
    assert listed.count == 3 and listed.next is not None  # page_size 2
    assert [w.id for w in api.list(page=2)[0].results] == ids[2:]
    api.destroy(ids[0])
    assert sorted(cvat.webhooks) == ids[1:]
    assert api.retrieve(ids[1])[0].project_id == project


def test_jobs_and_cloud_storage(cvat: CvatEmulator) -> None:
    storage_id = cvat.add_cloud_storage(
        "frames-bucket",
        endpoint_url="https://s3.us-west-004.backblazeb2.com",
        manifests=["manifest.jsonl"],
        prefix="frames/",
    )
    image = png()
    keys = [f"frames/{i:06d}.png" for i in range(3)]
    task = cvat.add_task([{"name": "car"}], [(k, image) for k in keys], cloud_storage_id=storage_id)
    client = sdk(cvat)

    remote = client.tasks.retrieve(task.id)
    assert (remote.data_cloud_storage_id, remote.segment_size, remote.jobs.count) == (storage_id, 3, 1)
    meta = remote.get_meta()
    assert (meta.storage, meta.cloud_storage_id) == ("cloud_storage", storage_id)
    assert [f.name for f in meta.frames] == keys
    assert remote.get_frame(1, quality="original").getvalue() == image
    (job,) = remote.get_jobs()
    assert (job.start_frame, job.stop_frame, job.state, job.stage, job.assignee) == (
        0,
        2,
        "new",
        "annotation",
        None,
    )
    storage = client.api_client.cloudstorages_api.retrieve(storage_id)[0]
    assert (str(storage.provider_type), storage.resource) == ("AWS_S3_BUCKET", "frames-bucket")
    assert str(storage.credentials_type) == "KEY_SECRET_KEY_PAIR" and storage.manifests == ["manifest.jsonl"]
    assert storage.specific_attributes == (
        "endpoint_url=https%3A%2F%2Fs3.us-west-004.backblazeb2.com&prefix=frames%2F"
    )
