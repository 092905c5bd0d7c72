"""A loopback emulation of the part of CVAT 2.x's REST API that cvat-sdk calls to read a task and upload
annotations into it, and of CVAT's webhooks; no CVAT server can run where the tests run.

It is a real HTTP server on 127.0.0.1. Replies have the JSON shapes of CVAT's serializers (cvat-sdk's
OpenAPI models deserialize and type-check every one, so a wrong shape fails loudly), and uploads are checked
with the rules of CVAT's ShapeSerializer and LabeledDataSerializer (../shared/docs/cvat-protocols.md §C):
point counts per type, mask RLE against its box, skeleton elements against the label's sublabels, label
ids of the task, shape type against label type, frames within the task. Endpoints:

    GET  /api/server/about                      (no authentication, like CVAT)
    POST /api/auth/login                        sessionid + csrftoken cookies
    GET  /api/tasks/{id}                        bearer token (PAT) or session (+ X-CSRFToken to write)
    GET  /api/labels?task_id=|job_id=&page=     paginated, `page_size` items per page (so are all lists)
    GET  /api/tasks/{id}/data/meta
    GET  /api/tasks/{id}/data/?type=frame&number=N&quality=original
    GET  /api/tasks/{id}/annotations/
    PUT  /api/tasks/{id}/annotations/           replaces every annotation of the task
    PATCH /api/tasks/{id}/annotations/?action=create|update|delete
                                                update and delete name annotations by id; an update
                                                replaces the stored annotation and keeps its id, with the
                                                `source` the client sends (cvat-core computes it: an edited
                                                auto shape comes back as semi-auto)
    POST /api/tasks                             a task without data yet (name, labels or project_id,
                                                segment_size)
    POST /api/tasks/{id}/data/                  JSON DataRequest from a cloud storage only: server_files
                                                (object keys, and its manifest as the one .jsonl) with
                                                cloud_storage_id; `sorting_method` predefined keeps their
                                                order; recorded in the task's `data_request`; 202 rq_id
    GET  /api/requests/{rq_id}                  finished, or failed with CVAT's reason
    GET  /api/jobs?task_id=&page=
    GET  /api/jobs/{id}
    GET  /api/cloudstorages/{id}
    POST /api/webhooks                          org context from X-Organization or ?org=; 201, no secret
    GET  /api/webhooks?page=                    only the org context's webhooks when one is given
    GET  /api/webhooks/{id}
    DELETE /api/webhooks/{id}
    POST /api/webhooks/{id}/ping                delivers a `ping` event, answers the delivery

`requests` records every call; `on_write(method)` runs after an upload is stored and before it is
answered (the crash tests kill the uploader there); `fail_writes_after_storing` answers that many stored
uploads with HTTP 500, like a gateway timing out on a request that went through; `fail_writes` refuses
that many uploads with HTTP 503 without storing them.

Projects exist through `add_project(name, organization)`, or implicitly when `add_task` names a
`project_id` not seen before; a task in a project belongs to the project's organization unless it names
its own. A task is split into jobs of `segment_size` frames. Webhooks fire like CVAT's: `update_job()`
changes a job and delivers `update:job` (with `before_update`, the changed keys' old values), `add_task`
delivers `create:task`, to each active webhook of the task's project or organization subscribed to the
event. Deliveries are synchronous, signed with the webhook's secret (X-Signature-256) and recorded in
`deliveries`; `deliver()` sends any payload (raw, repeated, badly signed) to a webhook's target.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import hashlib
import hmac
import io
import json
import re
import secrets
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from PIL import Image

VERSION = "2.80.0"
SOURCES = {"auto", "semi-auto", "manual", "file", "consensus"}
DATE = "2026-01-01T00:00:00.000000Z"
NOT_FOUND = {"detail": "Not found."}
STATES = ("new", "in progress", "rejected", "completed")
STAGES = ("annotation", "validation", "acceptance")
# cvat/apps/webhooks/event_type.py: every event an organization webhook may take; a project webhook only
# those of things inside a project.
EVENTS = {
    f"{action}:{resource}"
    for resource in ("project", "task", "job", "issue", "comment", "membership")
    for action in ("create", "update", "delete")
} | {
    "create:invitation",
    "delete:invitation",
    "update:organization",
    "delete:organization",
}
PROJECT_EVENTS = {e for e in EVENTS if e.split(":")[1] in ("task", "job", "issue", "comment")} | {
    "update:project",
    "delete:project",
}
WEBHOOK_TIMEOUT = 10  # seconds, CVAT's WEBHOOK_TIMEOUT
RESPONSE_LIMIT = 1024 * 1024  # bytes of a target's reply kept in the delivery log


class Default(enum.Enum):
    """Markers for keyword defaults where None is a value: an unassigned job, an unsigned delivery."""

    UNCHANGED = "unchanged"
    COMPUTED = "computed"


UNCHANGED, COMPUTED = Default.UNCHANGED, Default.COMPUTED


@dataclass
class EmulatedFrame:
    name: str
    data: bytes  # the original image file

    @property
    def size(self) -> tuple[int, int]:
        with Image.open(io.BytesIO(self.data)) as image:
            return image.size


@dataclass
class EmulatedTask:
    id: int
    labels: list[dict[str, Any]]  # CVAT label JSON without ids: {"name", "type", "sublabels"?: [{"name"}]}
    frames: list[EmulatedFrame]
    deleted: set[int] = field(default_factory=set)
    organization: str | None = None
    video: bool = False  # one media file: frame meta holds only its name and size
    annotations: dict[str, Any] = field(default_factory=lambda: {"version": 0, "tags": [], "shapes": []})
    project_id: int | None = None
    segment_size: int = 0  # frames per job
    cloud_storage_id: int | None = None  # frame names are then the objects' keys in its bucket
    jobs: list[EmulatedJob] = field(default_factory=list)
    name: str = ""
    data_request: dict[str, Any] | None = None  # the body of POST /api/tasks/{id}/data/, for a created task


@dataclass
class EmulatedJob:
    id: int
    task_id: int
    start_frame: int  # task frame numbers, both inclusive
    stop_frame: int
    assignee: str | None = None  # a username
    state: str = "new"
    stage: str = "annotation"
    type: str = "annotation"


@dataclass
class EmulatedProject:
    id: int
    name: str
    organization: str | None = None


@dataclass
class EmulatedCloudStorage:
    id: int
    bucket: str
    endpoint_url: str
    manifests: list[str]
    prefix: str = ""
    organization: str | None = None
    objects: dict[str, bytes] = field(default_factory=dict)  # key -> bytes, what its manifests list


@dataclass
class EmulatedWebhook:
    id: int
    target_url: str
    type: str  # "project" | "organization"
    events: list[str]
    secret: str  # "" for none, as CVAT stores it; never in a reply
    project_id: int | None
    organization: str | None  # slug
    content_type: str = "application/json"
    is_active: bool = True
    enable_ssl: bool = True
    description: str = ""


@dataclass
class Delivery:
    id: int
    webhook_id: int
    event: str
    target_url: str
    status_code: int  # the target's, or 502 (unreachable) / 504 (timed out) as CVAT logs them
    response: str  # the target's reply body
    payload: Any  # the JSON object sent (the bytes, for a raw `deliver`)
    headers: dict[str, str]


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


class CvatEmulator:
    def __init__(
        self, token: str = "good-token", users: dict[str, str] | None = None, page_size: int = 2
    ) -> None:
        self.token = token
        self.users = users if users is not None else {"alice": "wonderland"}
        self.page_size = page_size
        self.tasks: dict[int, EmulatedTask] = {}
        self.jobs: dict[int, EmulatedJob] = {}
        self.projects: dict[int, EmulatedProject] = {}
        self.cloud_storages: dict[int, EmulatedCloudStorage] = {}
        self.webhooks: dict[int, EmulatedWebhook] = {}
        self.deliveries: list[Delivery] = []
        # Issues (CVAT's IssueRead without comments) and their comments; an issue's message is its first.
        self.issues: dict[int, dict[str, Any]] = {}
        self.comments: list[dict[str, Any]] = []
        self.requests: list[Recorded] = []
        self.background: dict[str, dict[str, Any]] = {}  # /api/requests: rq_id -> CVAT's Request JSON
        self.on_write: Callable[[str], None] | None = None
        self.fail_writes_after_storing = 0
        self.fail_writes = 0
        self._sessions: dict[str, str] = {}  # sessionid → csrftoken
        self._user_ids = {"alice": 1}  # alice owns everything and makes every change
        self._org_ids: dict[str, int] = {}
        self._next_id = 1
        self._lock = threading.RLock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> CvatEmulator:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- set-up and inspection -------------------------------------------------------------------------

    def add_task(
        self,
        labels: list[dict[str, Any]],
        frames: list[tuple[str, bytes]],
        deleted: set[int] | None = None,
        organization: str | None = None,
        video: bool = False,
        *,
        project_id: int | None = None,
        segment_size: int | None = None,
        cloud_storage_id: int | None = None,
    ) -> EmulatedTask:
        """A task of `frames` (for a cloud storage task: (object key, the object's bytes)), split into jobs of
        `segment_size` frames; delivers `create:task` to the webhooks that watch it."""
        with self._lock:
            if project_id is not None and project_id not in self.projects:
                self.projects[project_id] = EmulatedProject(project_id, f"project {project_id}", organization)
            if project_id is not None and organization is None:
                organization = self.projects[project_id].organization
            if cloud_storage_id is not None and cloud_storage_id not in self.cloud_storages:
                raise ValueError(f"no cloud storage {cloud_storage_id}")
            task_id = 40 + len(self.tasks) + 1
            labeled = []
            for label in labels:
                entry = {"id": self._new_id(), "name": label["name"], "type": label.get("type", "any")}
                entry["sublabels"] = [
                    {"id": self._new_id(), "name": sub["name"], "type": "points"}
                    for sub in label.get("sublabels", [])
                ]
                labeled.append(entry)
            task = EmulatedTask(
                task_id,
                labeled,
                [EmulatedFrame(n, d) for n, d in frames],
                deleted or set(),
                organization,
                video,
                project_id=project_id,
                segment_size=segment_size or len(frames),
                cloud_storage_id=cloud_storage_id,
            )
            for start in range(0, len(frames), task.segment_size or 1):
                stop = min(start + task.segment_size, len(frames)) - 1
                task.jobs.append(EmulatedJob(self._new_id(), task_id, start, stop))
            self.jobs.update((job.id, job) for job in task.jobs)
            self.tasks[task_id] = task
            created = self._task_json(task)
        self._fire("create:task", task, {"task": created})
        return task

    def add_project(self, name: str, organization: str | None = None) -> int:
        with self._lock:
            project = EmulatedProject(self._new_id(), name, organization)
            self.projects[project.id] = project
            return project.id

    def add_cloud_storage(
        self,
        bucket: str,
        *,
        endpoint_url: str,
        manifests: list[str],
        prefix: str = "",
        organization: str | None = None,
        objects: dict[str, bytes] | None = None,
    ) -> int:
        """An S3 bucket attached as CVAT attaches one (access key pair); `add_task(cloud_storage_id=...)`.
        `objects`: the images its manifests list (key -> bytes), from which a created task gets its frames."""
        with self._lock:
            storage = EmulatedCloudStorage(
                self._new_id(), bucket, endpoint_url, manifests, prefix, organization, dict(objects or {})
            )
            self.cloud_storages[storage.id] = storage
            return storage.id

    def update_job(
        self,
        job_id: int,
        *,
        assignee: str | None | Default = UNCHANGED,
        state: str | Default = UNCHANGED,
        stage: str | Default = UNCHANGED,
    ) -> list[Delivery]:
        """Change a job as a user does in CVAT's UI (PATCH /api/jobs/{id}), then deliver `update:job`."""
        with self._lock:
            job = self.jobs[job_id]
            if state not in (UNCHANGED, *STATES) or stage not in (UNCHANGED, *STAGES):
                raise ValueError(f"state must be one of {STATES} and stage one of {STAGES}")
            before = self._job_json(job)
            if stage is not UNCHANGED:
                if stage != job.stage and state is UNCHANGED:
                    job.state = "new"  # CVAT's JobWriteSerializer: a job in a new stage starts over
                job.stage = stage
            if state is not UNCHANGED:
                job.state = state
            if assignee is not UNCHANGED:
                job.assignee = assignee
            after = self._job_json(job)
            changed = {key: value for key, value in before.items() if after[key] != value}
        if not changed:
            return []
        return self._fire("update:job", self.tasks[job.task_id], {"job": after, "before_update": changed})

    def deliver(
        self, webhook_id: int, payload: dict[str, Any] | bytes, *, signature: str | None | Default = COMPUTED
    ) -> Delivery:
        """POST a payload to a webhook's target as CVAT's send_webhook does. `signature` is the
        X-Signature-256 header: computed from the webhook's secret (none without one), as given, or none."""
        webhook = self.webhooks[webhook_id]
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
        if signature is COMPUTED:
            digest = hmac.new(webhook.secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
            signature = "sha256=" + digest if webhook.secret else None
        headers = {"Content-Type": "application/json"}
        if signature is not None:
            headers["X-Signature-256"] = signature
        status, response = _post(webhook.target_url, body, headers, webhook.enable_ssl)
        event = str(payload.get("event", "")) if isinstance(payload, dict) else ""
        with self._lock:
            delivery = Delivery(
                self._new_id(), webhook_id, event, webhook.target_url, status, response, payload, headers
            )
            self.deliveries.append(delivery)
        return delivery

    def _fire(self, event: str, task: EmulatedTask, data: dict[str, Any]) -> list[Delivery]:
        """Deliver an event of a task (or its job) to each active webhook watching it; never under the lock,
        since a target may call back into the emulator while it answers."""
        with self._lock:
            webhooks = [w for w in self.webhooks.values() if w.is_active and event in w.events]
        webhooks = [w for w in webhooks if _watches(w, task)]
        sender = self._user_json("alice")
        return [
            self.deliver(w.id, {"event": event, **data, "webhook_id": w.id, "sender": sender})
            for w in webhooks
        ]

    def calls(self, method: str, path_part: str = "") -> list[Recorded]:
        return [r for r in self.requests if r.method == method and path_part in r.path]

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _user_json(self, username: str) -> dict[str, Any]:
        user_id = self._user_ids.setdefault(username, len(self._user_ids) + 1)
        url = f"{self.url}/api/users/{user_id}"
        return {"url": url, "id": user_id, "username": username, "first_name": "", "last_name": ""}

    def _org_id(self, slug: str | None) -> int | None:
        return None if not slug else self._org_ids.setdefault(slug, 7 + len(self._org_ids))

    # -- JSON as CVAT's serializers write it ---------------------------------------------------------------

    def _task_json(self, task: EmulatedTask) -> dict[str, Any]:
        base = self.url
        return {
            "url": f"{base}/api/tasks/{task.id}",
            "id": task.id,
            "name": task.name or f"task {task.id}",
            "project_id": task.project_id,
            "mode": "interpolation" if task.video else "annotation",
            "owner": self._user_json("alice"),
            "assignee": None,
            "bug_tracker": "",
            "created_date": DATE,
            "updated_date": DATE,
            "overlap": 0,
            "segment_size": task.segment_size,
            "status": "annotation",
            "data_chunk_size": 72,
            "data_compressed_chunk_type": "video" if task.video else "imageset",
            "guide_id": None,
            "data_original_chunk_type": "video" if task.video else "imageset",
            "size": len(task.frames),
            "image_quality": 70,
            "data": task.id,
            "dimension": "2d",
            "subset": "",
            "organization": self._org_id(task.organization),
            "target_storage": None,
            "source_storage": None,
            "jobs": {
                "count": len(task.jobs),
                "completed": sum(job.state == "completed" for job in task.jobs),
                "validation": sum(job.stage == "validation" for job in task.jobs),
                "url": f"{base}/api/jobs?task_id={task.id}",
            },
            "labels": {"url": f"{base}/api/labels?task_id={task.id}"},
            "assignee_updated_date": None,
            "validation_mode": None,
            "data_cloud_storage_id": task.cloud_storage_id,
        }

    def _job_json(self, job: EmulatedJob) -> dict[str, Any]:
        base, task = self.url, self.tasks[job.task_id]
        project = self.projects.get(task.project_id) if task.project_id is not None else None
        # CVAT's JobWriteSerializer keeps the deprecated status in step with the stage.
        status = "annotation" if job.stage == "annotation" else "validation"
        if job.stage == "acceptance" and job.state == "completed":
            status = "completed"
        return {
            "url": f"{base}/api/jobs/{job.id}",
            "id": job.id,
            "task_id": task.id,
            "task_name": f"task {task.id}",
            "project_id": task.project_id,
            "project_name": project.name if project else None,
            "assignee": self._user_json(job.assignee) if job.assignee is not None else None,
            "guide_id": None,
            "dimension": "2d",
            "bug_tracker": "",
            "status": status,
            "stage": job.stage,
            "state": job.state,
            "mode": "interpolation" if task.video else "annotation",
            "media_type": "video" if task.video else "image",
            "frame_count": job.stop_frame - job.start_frame + 1,
            "start_frame": job.start_frame,
            "stop_frame": job.stop_frame,
            "data_chunk_size": 72,
            "data_compressed_chunk_type": "video" if task.video else "imageset",
            "data_original_chunk_type": "video" if task.video else "imageset",
            "created_date": DATE,
            "updated_date": DATE,
            "issues": {
                "url": f"{base}/api/issues?job_id={job.id}",
                "count": sum(i["job"] == job.id for i in self.issues.values()),
            },
            "labels": {"url": f"{base}/api/labels?job_id={job.id}"},
            "type": job.type,
            "organization": self._org_id(task.organization),
            "target_storage": None,
            "source_storage": None,
            "assignee_updated_date": None,
            "parent_job_id": None,
            "replicas_count": 0,
        }

    def _cloud_storage_json(self, storage: EmulatedCloudStorage) -> dict[str, Any]:
        attributes = {"endpoint_url": storage.endpoint_url}
        if storage.prefix:
            attributes["prefix"] = storage.prefix
        return {
            "id": storage.id,
            "owner": self._user_json("alice"),
            "manifests": list(storage.manifests),
            "provider_type": "AWS_S3_BUCKET",
            "resource": storage.bucket,
            "display_name": storage.bucket,
            "created_date": DATE,
            "updated_date": DATE,
            "credentials_type": "KEY_SECRET_KEY_PAIR",
            "specific_attributes": urlencode(attributes),  # as CVAT's UI writes it (URLSearchParams)
            "description": "",
            "organization": self._org_id(storage.organization),
        }

    def _webhook_json(self, webhook: EmulatedWebhook) -> dict[str, Any]:
        data = {
            "id": webhook.id,
            "url": f"{self.url}/api/webhooks/{webhook.id}",
            "target_url": webhook.target_url,
            "description": webhook.description,
            "type": webhook.type,
            "content_type": webhook.content_type,
            "is_active": webhook.is_active,
            "enable_ssl": webhook.enable_ssl,
            "created_date": DATE,
            "updated_date": DATE,
            "owner": self._user_json("alice"),
            "project_id": webhook.project_id,
            "organization": self._org_id(webhook.organization),
            "events": sorted(webhook.events),
        }
        # CVAT leaves these out until the first delivery (their source, deliveries.last, is None).
        last = next((d for d in reversed(self.deliveries) if d.webhook_id == webhook.id), None)
        if last is not None:
            data.update(last_status=last.status_code, last_delivery_date=DATE)
        return data

    @staticmethod
    def _delivery_json(delivery: Delivery) -> dict[str, Any]:
        return {
            "id": delivery.id,
            "webhook_id": delivery.webhook_id,
            "event": delivery.event,
            "status_code": delivery.status_code,
            "redelivery": False,
            "created_date": DATE,
            "updated_date": DATE,
            "changed_fields": "",
            "request": delivery.payload,
            "response": delivery.response,
        }

    def _page(
        self, path: str, query: dict[str, list[str]], items: list[dict[str, Any]], filters: dict[str, Any]
    ) -> dict[str, Any]:
        """One page of a list, with DRF's next/previous links (the filters repeated in them)."""
        page = int(query.get("page", ["1"])[0])
        start = (page - 1) * self.page_size
        more = start + self.page_size < len(items)
        link = f"{self.url}{path}?page={{}}" + "".join(f"&{key}={value}" for key, value in filters.items())
        return {
            "count": len(items),
            "next": link.format(page + 1) if more else None,
            "previous": link.format(page - 1) if page > 1 else None,
            "results": items[start : start + self.page_size],
        }

    @staticmethod
    def _label_json(task: EmulatedTask, label: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": label["id"],
            "name": label["name"],
            "color": "#33ddff",
            "attributes": [],
            "type": label["type"],
            "svg": "",
            "sublabels": [
                {
                    "id": s["id"],
                    "name": s["name"],
                    "color": "#ff6037",
                    "attributes": [],
                    "type": "points",
                    "has_parent": True,
                }
                for s in label["sublabels"]
            ],
            "project_id": None,
            "task_id": task.id,
            "parent_id": None,
            "has_parent": False,
        }

    @staticmethod
    def _meta_json(task: EmulatedTask) -> dict[str, Any]:
        frames = []
        for frame in task.frames[:1] if task.video else task.frames:
            width, height = frame.size
            frames.append(
                {
                    "width": width,
                    "height": height,
                    "name": frame.name,
                    "related_files": 0,
                    "has_related_context": False,
                }
            )
        return {
            "chunks_updated_date": DATE,
            "chunk_size": 72,
            "size": len(task.frames),
            "image_quality": 70,
            "start_frame": 0,
            "stop_frame": len(task.frames) - 1,
            "frame_filter": "",
            "frames": frames,
            "deleted_frames": sorted(task.deleted),
            "included_frames": None,
            "chapters": None,
            "storage": "local" if task.cloud_storage_id is None else "cloud_storage",
            "cloud_storage_id": task.cloud_storage_id,
        }

    # -- uploads: CVAT's validation, then storage -------------------------------------------------------

    def _validate(self, task: EmulatedTask, data: dict[str, Any]) -> str | None:
        labels = {label["id"]: label for label in task.labels}
        for tag in data.get("tags", []):
            label = labels.get(tag.get("label_id"))
            if label is None or label["type"] not in ("any", "tag"):
                return f"tag: label {tag.get('label_id')} is not a tag label of task {task.id}"
            if problem := self._common(task, tag):
                return problem
        for shape in data.get("shapes", []):
            label = labels.get(shape.get("label_id"))
            if label is None:
                return f"shape: label {shape.get('label_id')} is not a label of task {task.id}"
            kind, points = shape.get("type"), shape.get("points", [])
            if label["type"] != kind and (label["type"] != "any" or kind == "skeleton"):
                return f"shape: a {kind} cannot have the {label['type']} label {label['name']!r}"
            if problem := self._common(task, shape) or _geometry(kind, points, shape.get("rotation", 0.0)):
                return problem
            elements = shape.get("elements", [])
            if kind != "skeleton":
                if elements:
                    return "shape: only skeletons have elements"
                continue
            sublabels = {s["id"] for s in label["sublabels"]}
            ids = [e.get("label_id") for e in elements]
            if sorted(ids) != sorted(sublabels):
                return f"skeleton: elements {ids} are not one per sublabel {sorted(sublabels)}"
            for element in elements:
                if element.get("type") != "points" or len(element.get("points", [])) != 2:
                    return "skeleton: every element is one point"
                if element.get("frame") != shape.get("frame"):
                    return "skeleton: elements are on the skeleton's frame"
        return None

    @staticmethod
    def _common(task: EmulatedTask, annotation: dict[str, Any]) -> str | None:
        if "id" in annotation and annotation["id"] is not None:
            return "new annotations have no id"
        if not 0 <= annotation.get("frame", -1) < len(task.frames):
            return f"frame {annotation.get('frame')} is not in task {task.id}"
        if annotation.get("source", "manual") not in SOURCES:
            return f"source {annotation.get('source')!r} is not one of {sorted(SOURCES)}"
        return None

    def _check_ids(self, task: EmulatedTask, data: dict[str, Any], action: str) -> str | None:
        """An update or delete names stored annotations by id; an update is also checked as an upload is."""
        if data.get("tracks"):
            return "tracks are not emulated"
        for kind in ("tags", "shapes"):
            ids = {a["id"] for a in task.annotations[kind]}
            for annotation in data.get(kind, []):
                if annotation.get("id") not in ids:
                    return f"{kind}: no annotation {annotation.get('id')} in task {task.id}"
        if action == "delete":
            return None
        without_ids = {k: [{**a, "id": None} for a in data.get(k, [])] for k in ("tags", "shapes")}
        return self._validate(task, without_ids)

    def _change(self, task: EmulatedTask, data: dict[str, Any], action: str) -> dict[str, Any]:
        """Apply an update (the annotation replaced, its id kept) or a delete; CVAT answers with the data."""
        for kind in ("tags", "shapes"):
            given = {a["id"]: a for a in data.get(kind, [])}
            kept = []
            for stored in task.annotations[kind]:
                if stored["id"] not in given:
                    kept.append(stored)
                elif action == "update":
                    new = copy.deepcopy(given[stored["id"]])
                    new.pop("id")
                    kept.append({**_with_defaults(new, kind, self._new_id), "id": stored["id"]})
            task.annotations[kind] = kept
        task.annotations["version"] += 1
        return {
            "version": task.annotations["version"],
            "tracks": [],
            **{k: data.get(k, []) for k in ("tags", "shapes")},
        }

    def _store(self, task: EmulatedTask, data: dict[str, Any], replace: bool) -> dict[str, Any]:
        created: dict[str, Any] = {"version": 0, "tags": [], "shapes": [], "tracks": []}
        for kind in ("tags", "shapes"):
            for annotation in data.get(kind, []):
                stored = _with_defaults(copy.deepcopy(annotation), kind, self._new_id)
                created[kind].append(stored)
        if replace:
            task.annotations = {"version": task.annotations["version"] + 1, "tags": [], "shapes": []}
        else:
            task.annotations["version"] += 1
        task.annotations["tags"] += created["tags"]
        task.annotations["shapes"] += created["shapes"]
        created["version"] = task.annotations["version"]
        return created

    # -- HTTP ------------------------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def do_PUT(self) -> None:  # noqa: N802
                self._serve("PUT")

            def do_PATCH(self) -> None:  # noqa: N802
                self._serve("PATCH")

            def do_DELETE(self) -> None:  # noqa: N802
                self._serve("DELETE")

            def _serve(self, method: str) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                query = parse_qs(parts.query)
                with emulator._lock:
                    emulator.requests.append(Recorded(method, parts.path, query, body))
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client died meanwhile
                    emulator._route(self, method, parts.path, query, body)

            def reply(
                self,
                status: int,
                payload: Any,
                content_type: str = "application/vnd.cvat+json",
                cookies: str = "",
            ) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for cookie in filter(None, cookies.split("\n")):
                    self.send_header("Set-Cookie", cookie)
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def _user(self, handler: Any, method: str) -> tuple[int, str] | None:
        """None when authenticated, else the (status, detail) CVAT answers."""
        auth = handler.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return None if auth.removeprefix("Bearer ") == self.token else (401, "Invalid token.")
        cookies = SimpleCookie(handler.headers.get("Cookie", ""))
        session = cookies.get("sessionid")
        if session is not None and session.value in self._sessions:
            csrf = self._sessions[session.value]
            if method not in ("GET", "HEAD") and handler.headers.get("X-CSRFToken") != csrf:
                return 403, "CSRF Failed: CSRF token missing or incorrect."
            return None
        return 401, "Authentication credentials were not provided."

    def _route(self, handler: Any, method: str, path: str, query: dict[str, list[str]], body: Any) -> None:
        if (method, path) == ("GET", "/api/server/about"):
            return handler.reply(
                200,
                {
                    "name": "Computer Vision Annotation Tool",
                    "description": "CVAT REST API emulation for labelserve's tests",
                    "version": VERSION,
                    "logo_url": f"{self.url}/static/logo.svg",
                    "subtitle": "emulated",
                },
            )
        if (method, path) == ("POST", "/api/auth/login"):
            body = body or {}
            if self.users.get(body.get("username", "")) != body.get("password"):
                return handler.reply(
                    400, {"non_field_errors": ["Unable to log in with provided credentials."]}
                )
            session, csrf = secrets.token_hex(16), secrets.token_hex(16)
            self._sessions[session] = csrf
            # Django's order, valued attributes last: cvat-sdk reads both cookies from one joined header.
            cookies = (
                f"sessionid={session}; HttpOnly; Path=/; SameSite=Lax\ncsrftoken={csrf}; Path=/; SameSite=Lax"
            )
            return handler.reply(200, {"key": secrets.token_hex(20)}, cookies=cookies)
        refused = self._user(handler, method)
        if refused is not None:
            return handler.reply(refused[0], {"detail": refused[1]})

        if (method, path) == ("GET", "/api/labels"):
            owner = "job_id" if "job_id" in query else "task_id"
            owner_id = int(query.get(owner, ["0"])[0])
            job = self.jobs.get(owner_id) if owner == "job_id" else None
            task = self.tasks.get(job.task_id if job is not None else owner_id if owner == "task_id" else 0)
            if task is None:
                return handler.reply(404, NOT_FOUND)
            labels = [self._label_json(task, label) for label in task.labels]
            return handler.reply(200, self._page(path, query, labels, {owner: owner_id}))
        if (method, path) == ("GET", "/api/jobs"):
            task_id = query.get("task_id", [None])[0]
            jobs = [j for j in self.jobs.values() if task_id is None or j.task_id == int(task_id)]
            filters = {} if task_id is None else {"task_id": task_id}
            return handler.reply(200, self._page(path, query, [self._job_json(j) for j in jobs], filters))
        if method == "GET" and (found := re.fullmatch(r"/api/jobs/(\d+)", path)):
            job = self.jobs.get(int(found[1]))
            return handler.reply(200, self._job_json(job)) if job else handler.reply(404, NOT_FOUND)
        if method == "GET" and (found := re.fullmatch(r"/api/cloudstorages/(\d+)", path)):
            storage = self.cloud_storages.get(int(found[1]))
            if storage is None:
                return handler.reply(404, NOT_FOUND)
            return handler.reply(200, self._cloud_storage_json(storage))
        if path in ("/api/issues", "/api/comments"):
            return self._route_issues(handler, method, path, query, body)
        if re.fullmatch(r"/api/webhooks(/\d+(/ping)?)?", path):
            return self._route_webhooks(handler, method, path, query, body)
        if (method, path) == ("POST", "/api/tasks"):
            return self._create_task(handler, body if isinstance(body, dict) else {})
        if method == "GET" and (found := re.fullmatch(r"/api/requests/(.+)", path)):
            request = self.background.get(unquote(found[1]))
            return handler.reply(200, request) if request else handler.reply(404, NOT_FOUND)
        found = re.fullmatch(r"/api/tasks/(\d+)(/.*)?", path)
        if found is None:
            return handler.reply(404, {"detail": "Not found."})
        task = self.tasks.get(int(found[1]))
        if task is None:
            return handler.reply(404, {"detail": "Not found."})
        rest = found[2] or ""
        if (method, rest) == ("GET", ""):
            return handler.reply(200, self._task_json(task))
        if (method, rest) == ("POST", "/data/"):
            return self._add_data(handler, task, body if isinstance(body, dict) else {})
        if (method, rest) == ("GET", "/data/meta"):
            return handler.reply(200, self._meta_json(task))
        if (method, rest) == ("GET", "/data/"):
            number = int(query.get("number", ["-1"])[0])
            if query.get("type") != ["frame"] or not 0 <= number < len(task.frames):
                return handler.reply(400, {"detail": "Wrong frame request."})
            data = task.frames[number].data
            return handler.reply(200, data, content_type=Image.MIME[Image.open(io.BytesIO(data)).format])
        if rest == "/annotations/":
            if method == "GET":
                return handler.reply(200, {**copy.deepcopy(task.annotations), "tracks": []})
            action = query.get("action", [""])[0]
            if method == "PATCH" and action in ("update", "delete"):
                problem = self._check_ids(task, body or {}, action)
                if problem is not None:
                    return handler.reply(400, {"detail": problem})
                with self._lock:
                    changed = self._change(task, body or {}, action)
                return handler.reply(200, changed)
            if method == "PATCH" and action != "create":
                return handler.reply(400, {"detail": "action must be create, update or delete."})
            if method in ("PUT", "PATCH"):
                if self.fail_writes:
                    self.fail_writes -= 1
                    return handler.reply(503, {"detail": "Service unavailable (emulated)."})
                problem = self._validate(task, body or {})
                if problem is not None:
                    return handler.reply(400, {"detail": problem})
                with self._lock:
                    created = self._store(task, body or {}, replace=method == "PUT")
                if self.on_write is not None:
                    self.on_write(method)
                if self.fail_writes_after_storing:
                    self.fail_writes_after_storing -= 1
                    return handler.reply(500, {"detail": "Gateway gave up waiting (emulated)."})
                return handler.reply(200, created)
        return handler.reply(405, {"detail": f'Method "{method}" not allowed.'})

    def _create_task(self, handler: Any, body: dict[str, Any]) -> None:
        """TaskWriteSerializer: a name, and labels or a project's; the data come after."""
        if not body.get("name"):
            return handler.reply(400, {"name": ["This field is required."]})
        if bool(body.get("labels")) == (body.get("project_id") is not None):
            return handler.reply(400, {"labels": ["Give labels, or a project_id (its labels)."]})
        if body.get("project_id") is not None and body["project_id"] not in self.projects:
            return handler.reply(400, {"project_id": [f'Invalid pk "{body["project_id"]}".']})
        with self._lock:
            task_id = 40 + len(self.tasks) + 1
            labels = [
                {
                    "id": self._new_id(),
                    "name": label["name"],
                    "type": label.get("type", "any"),
                    "sublabels": [],
                }
                for label in body.get("labels") or []
            ]
            project = body.get("project_id")
            organization = self.projects[project].organization if project is not None else None
            task = EmulatedTask(
                task_id, labels, [], organization=organization, project_id=project,
                segment_size=int(body.get("segment_size") or 0), name=body["name"],
            )  # fmt: skip
            self.tasks[task_id] = task
        return handler.reply(201, self._task_json(task))

    def _add_data(self, handler: Any, task: EmulatedTask, body: dict[str, Any]) -> None:
        """A task's data from a cloud storage (cvat/apps/engine/task.py): the one .jsonl among server_files is
        the manifest, which must be attached to the storage; every other file must be one it lists. CVAT
        checks in the background: a problem fails the request (GET /api/requests/{rq_id})."""
        if task.data_request is not None or task.frames:
            return handler.reply(400, {"detail": "Adding more data is not supported"})
        rq_id = f"create:task-{task.id}"
        task.data_request = copy.deepcopy(body)
        storage = self.cloud_storages.get(body.get("cloud_storage_id") or 0)
        files = list(body.get("server_files") or [])
        manifests = [f for f in files if f.endswith(".jsonl")]
        media = [f for f in files if not f.endswith(".jsonl")]
        problem = None
        if body.get("client_files") or body.get("remote_files") or storage is None:
            problem = "only server_files from a cloud storage (cloud_storage_id) are emulated"
        elif len(manifests) != 1 or manifests[0] not in storage.manifests:
            problem = f"one manifest attached to cloud storage {storage.id} is required, got {manifests}"
        elif not media or any(f not in storage.objects for f in media):
            problem = f"files not in the manifest: {[f for f in media if f not in storage.objects][:5]}"
        elif body.get("sorting_method", "lexicographical") not in ("lexicographical", "predefined"):
            problem = "only lexicographical and predefined sorting are emulated"
        if problem is None and storage is not None:
            order = media if body.get("sorting_method") == "predefined" else sorted(media)
            with self._lock:
                task.frames = [EmulatedFrame(key, storage.objects[key]) for key in order]
                task.cloud_storage_id = storage.id
                task.segment_size = task.segment_size or len(order)
                for start in range(0, len(order), task.segment_size):
                    stop = min(start + task.segment_size, len(order)) - 1
                    task.jobs.append(EmulatedJob(self._new_id(), task.id, start, stop))
                self.jobs.update((job.id, job) for job in task.jobs)
        status = "failed" if problem else "finished"
        self.background[rq_id] = {
            "status": status,
            "message": problem or "",
            "id": rq_id,
            "operation": {"type": "create:task", "target": "task", "task_id": task.id, "project_id": None,
                          "job_id": None, "format": None, "function_id": None, "org_id": None},
            "progress": 1.0,
            "created_date": DATE,
            "started_date": DATE,
            "finished_date": DATE,
            "expiry_date": DATE,
            "owner": self._user_json("alice"),
            "result_url": None,
            "result_id": None,
        }  # fmt: skip
        return handler.reply(202, {"rq_id": rq_id})

    def _route_issues(
        self, handler: Any, method: str, path: str, query: dict[str, list[str]], body: Any
    ) -> None:
        """CVAT's issues (IssueWriteSerializer: frame, position, job, message; the message becomes the first
        comment) and comments, listed with the job_id / issue_id filters."""
        filters = {k: int(query[k][0]) for k in ("job_id", "issue_id", "frame_id") if k in query}
        if method == "GET" and path == "/api/issues":
            found = [
                self._issue_json(i)
                for i in self.issues.values()
                if all(
                    i[{"job_id": "job", "frame_id": "frame"}.get(k, "id")] == v for k, v in filters.items()
                )
            ]
            return handler.reply(200, self._page(path, query, found, filters))
        if method == "GET" and path == "/api/comments":
            jobs = {i["id"]: i["job"] for i in self.issues.values()}
            found = [
                c
                for c in self.comments
                if filters.get("issue_id", c["issue"]) == c["issue"]
                and filters.get("job_id", jobs[c["issue"]]) == jobs[c["issue"]]
            ]
            return handler.reply(200, self._page(path, query, found, filters))
        if method != "POST" or path != "/api/issues":
            return handler.reply(405, {"detail": f'Method "{method}" not allowed.'})
        body = body or {}
        errors: dict[str, list[str]] = {}
        job = self.jobs.get(body.get("job")) if isinstance(body.get("job"), int) else None
        if job is None:
            errors["job"] = [f'Invalid pk "{body.get("job")}" - object does not exist.']
        frame = body.get("frame")
        if not isinstance(frame, int) or frame < 0:
            errors["frame"] = ["A valid integer is required."]
        elif job is not None and not job.start_frame <= frame <= job.stop_frame:
            errors["frame"] = [
                f"The frame number should be in the [{job.start_frame}, {job.stop_frame}] range"
            ]
        position = body.get("position")
        if (
            not isinstance(position, list)
            or not position
            or not all(isinstance(v, int | float) for v in position)
        ):
            errors["position"] = [
                "This list may not be empty." if position == [] else "A valid number is required."
            ]
        if not isinstance(body.get("message"), str) or not body["message"]:
            errors["message"] = ["This field may not be blank."]
        if errors:
            return handler.reply(400, errors)
        with self._lock:
            issue_id = self._new_id()
            points = [float(v) for v in position]
            resolved = bool(body.get("resolved", False))
            self.issues[issue_id] = {
                "id": issue_id, "frame": frame, "position": points, "job": body["job"], "resolved": resolved
            }  # fmt: skip
            self.comments.append(
                {"id": self._new_id(), "issue": issue_id, "owner": self._user_json("alice"),
                 "message": body["message"], "created_date": DATE, "updated_date": DATE}
            )  # fmt: skip
        return handler.reply(201, self._issue_json(self.issues[issue_id]))

    def _issue_json(self, issue: dict[str, Any]) -> dict[str, Any]:
        count = sum(c["issue"] == issue["id"] for c in self.comments)
        return {
            **issue,
            "owner": self._user_json("alice"),
            "assignee": None,
            "created_date": DATE,
            "updated_date": DATE,
            "comments": {"count": count, "url": f"{self.url}/api/comments?issue_id={issue['id']}"},
        }

    def _route_webhooks(
        self, handler: Any, method: str, path: str, query: dict[str, list[str]], body: Any
    ) -> None:
        # cvat-sdk sends the org context as X-Organization (client.organization_slug) or ?org=; "" is the
        # user's sandbox, no context at all lists every webhook.
        org = handler.headers.get("X-Organization", query.get("org", [None])[0])
        if (method, path) == ("POST", "/api/webhooks"):
            body = body if isinstance(body, dict) else {}
            errors = self._webhook_errors(body, org)
            if errors:
                return handler.reply(400, errors)
            with self._lock:
                project = self.projects.get(body.get("project_id")) if body["type"] == "project" else None
                # CVAT: a project webhook is in its project's organization.
                webhook = EmulatedWebhook(
                    self._new_id(),
                    body["target_url"],
                    body["type"],
                    list(body["events"]),
                    body.get("secret") or "",
                    body.get("project_id"),
                    project.organization if project is not None else org,
                    body.get("content_type", "application/json"),
                    body.get("is_active", True),
                    body.get("enable_ssl", True),
                    body.get("description", ""),
                )
                self.webhooks[webhook.id] = webhook
            return handler.reply(201, self._webhook_json(webhook))
        if (method, path) == ("GET", "/api/webhooks"):
            webhooks = [w for w in self.webhooks.values() if org is None or (w.organization or "") == org]
            return handler.reply(200, self._page(path, query, [self._webhook_json(w) for w in webhooks], {}))
        found = re.fullmatch(r"/api/webhooks/(\d+)(/ping)?", path)
        webhook = self.webhooks.get(int(found[1])) if found else None
        if webhook is None:
            return handler.reply(404, NOT_FOUND)
        if (method, found[2]) == ("GET", None):
            return handler.reply(200, self._webhook_json(webhook))
        if (method, found[2]) == ("DELETE", None):
            with self._lock:
                del self.webhooks[webhook.id]
            return handler.reply(204, b"")
        if (method, found[2]) == ("POST", "/ping"):
            sender = self._user_json("alice")
            payload = {"event": "ping", "webhook": self._webhook_json(webhook), "sender": sender}
            return handler.reply(200, self._delivery_json(self.deliver(webhook.id, payload)))
        return handler.reply(405, {"detail": f'Method "{method}" not allowed.'})

    def _webhook_errors(self, body: dict[str, Any], org: str | None) -> dict[str, list[str]]:
        """WebhookWriteSerializer's checks, as DRF's field errors."""
        required = ("target_url", "type", "events")
        errors = {name: ["This field is required."] for name in required if name not in body}
        if errors:
            return errors
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", str(body["target_url"])):
            errors["target_url"] = ["Enter a valid URL."]
        if body["type"] not in ("project", "organization"):
            errors["type"] = [f'"{body["type"]}" is not a valid choice.']
        events = body["events"] if isinstance(body["events"], list) else [body["events"]]
        if unknown := [e for e in events if e not in EVENTS]:
            errors["events"] = [f'"{unknown[0]}" is not a valid choice.']
        elif body["type"] == "project" and (outside := sorted(set(events) - PROJECT_EVENTS)):
            errors["events"] = [f"A project webhook cannot have the events {', '.join(outside)}."]
        if body["type"] == "project":
            project_id = body.get("project_id")
            if project_id is None:
                errors["project_id"] = ["A project webhook needs a project_id."]
            elif project_id not in self.projects:
                errors["project_id"] = [f"Project {project_id} does not exist."]
        elif body["type"] == "organization" and not org:
            errors["type"] = ["An organization webhook is created in an organization (X-Organization)."]
        return errors


def _watches(webhook: EmulatedWebhook, task: EmulatedTask) -> bool:
    """A project webhook watches its project's tasks, an organization webhook all of its organization's."""
    if webhook.type == "project":
        return webhook.project_id is not None and webhook.project_id == task.project_id
    return webhook.organization is not None and webhook.organization == task.organization


def _post(url: str, body: bytes, headers: dict[str, str], verify: bool) -> tuple[int, str]:
    """(status, reply body) of a POST; like CVAT's delivery log, 502 when the target cannot be reached and
    504 when it does not answer in time."""
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    # No proxy from the environment: the targets are loopback servers of the tests.
    handlers = urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    opener = urllib.request.build_opener(*handlers)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with opener.open(request, timeout=WEBHOOK_TIMEOUT) as response:
            return response.status, response.read(RESPONSE_LIMIT).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(RESPONSE_LIMIT).decode("utf-8", "replace")
    except OSError as exc:  # URLError included
        return (504 if isinstance(getattr(exc, "reason", exc), TimeoutError) else 502), ""


def _geometry(kind: str | None, points: list[float], rotation: float) -> str | None:
    """CVAT's ShapeSerializer.validate (§C)."""
    count = len(points)
    rules = {
        "rectangle": count == 4,
        "ellipse": count == 4,
        "polygon": count >= 6 and count % 2 == 0,
        "polyline": count >= 4 and count % 2 == 0,
        "points": count >= 2 and count % 2 == 0,
        "cuboid": count == 16,
        "mask": count >= 5,
        "skeleton": count == 0,
    }
    if kind not in rules:
        return f"unknown shape type {kind!r}"
    if not rules[kind]:
        return f"a {kind} cannot have {count} points"
    if not 0 <= rotation <= 360:
        return f"rotation {rotation} is not within 0..360"
    if kind == "mask":
        *runs, xtl, ytl, xbr, ybr = points
        if sum(runs) != (xbr - xtl + 1) * (ybr - ytl + 1):
            return f"mask runs sum to {sum(runs)}, not the area of the box {[xtl, ytl, xbr, ybr]}"
    return None


def _with_defaults(annotation: dict[str, Any], kind: str, new_id: Callable[[], int]) -> dict[str, Any]:
    """What CVAT stores and returns for an uploaded annotation: every field, an id, defaults filled."""
    annotation.update(
        id=new_id(), group=annotation.get("group") or 0, attributes=annotation.get("attributes", [])
    )
    annotation.setdefault("source", "manual")
    if kind == "shapes":
        for key, default in (("occluded", False), ("outside", False), ("z_order", 0), ("rotation", 0.0)):
            annotation.setdefault(key, default)
        annotation.setdefault("points", [])
        annotation["points"] = [float(v) for v in annotation["points"]]
        elements = annotation.setdefault("elements", [])
        for element in elements:
            element.update(id=new_id(), group=0, attributes=element.get("attributes", []))
            for key, default in (("occluded", False), ("outside", False), ("z_order", 0), ("rotation", 0.0)):
                element.setdefault(key, default)
            element.setdefault("source", "manual")
            element["points"] = [float(v) for v in element["points"]]
    return annotation
