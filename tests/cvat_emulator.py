"""A loopback emulation of the part of CVAT 2.x's REST API that cvat-sdk calls to read a task and upload
annotations into it; no CVAT server can run where the tests run.

It is a real HTTP server on 127.0.0.1. Replies have the JSON shapes of CVAT's serializers (cvat-sdk's
OpenAPI models deserialize and type-check every one, so a wrong shape fails loudly), and uploads are checked
with the rules of CVAT's ShapeSerializer and LabeledDataSerializer (../shared/docs/cvat-protocols.md §C):
point counts per type, mask RLE against its box, skeleton elements against the label's sublabels, label
ids of the task, shape type against label type, frames within the task. Endpoints:

    GET  /api/server/about                      (no authentication, like CVAT)
    POST /api/auth/login                        sessionid + csrftoken cookies
    GET  /api/tasks/{id}                        bearer token (PAT) or session (+ X-CSRFToken to write)
    GET  /api/labels?task_id=&page=             paginated, `page_size` labels per page
    GET  /api/tasks/{id}/data/meta
    GET  /api/tasks/{id}/data/?type=frame&number=N&quality=original
    GET  /api/tasks/{id}/annotations/
    PUT  /api/tasks/{id}/annotations/           replaces every annotation of the task
    PATCH /api/tasks/{id}/annotations/?action=create

`requests` records every call; `on_write(method)` runs after an upload is stored and before it is
answered (the crash tests kill the uploader there); `fail_writes_after_storing` answers that many stored
uploads with HTTP 500, like a gateway timing out on a request that went through; `fail_writes` refuses
that many uploads with HTTP 503 without storing them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image

VERSION = "2.80.0"
SOURCES = {"auto", "semi-auto", "manual", "file", "consensus"}
DATE = "2026-01-01T00:00:00.000000Z"


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
        self.requests: list[Recorded] = []
        self.on_write: Callable[[str], None] | None = None
        self.fail_writes_after_storing = 0
        self.fail_writes = 0
        self._sessions: dict[str, str] = {}  # sessionid → csrftoken
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
    ) -> EmulatedTask:
        with self._lock:
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
            )
            self.tasks[task_id] = task
            return task

    def calls(self, method: str, path_part: str = "") -> list[Recorded]:
        return [r for r in self.requests if r.method == method and path_part in r.path]

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    # -- JSON as CVAT's serializers write it ---------------------------------------------------------------

    def _task_json(self, task: EmulatedTask) -> dict[str, Any]:
        base = self.url
        return {
            "url": f"{base}/api/tasks/{task.id}",
            "id": task.id,
            "name": f"task {task.id}",
            "project_id": None,
            "mode": "interpolation" if task.video else "annotation",
            "owner": {
                "url": f"{base}/api/users/1",
                "id": 1,
                "username": "alice",
                "first_name": "",
                "last_name": "",
            },
            "assignee": None,
            "bug_tracker": "",
            "created_date": DATE,
            "updated_date": DATE,
            "overlap": 0,
            "segment_size": len(task.frames),
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
            "organization": 7 if task.organization else None,
            "target_storage": None,
            "source_storage": None,
            "jobs": {
                "count": 1,
                "completed": 0,
                "validation": 0,
                "url": f"{base}/api/jobs?task_id={task.id}",
            },
            "labels": {"url": f"{base}/api/labels?task_id={task.id}"},
            "assignee_updated_date": None,
            "validation_mode": None,
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
            "storage": "local",
            "cloud_storage_id": None,
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
            task = self.tasks.get(int(query.get("task_id", ["0"])[0]))
            if task is None:
                return handler.reply(404, {"detail": "Not found."})
            page = int(query.get("page", ["1"])[0])
            start = (page - 1) * self.page_size
            labels = task.labels[start : start + self.page_size]
            more = start + self.page_size < len(task.labels)
            return handler.reply(
                200,
                {
                    "count": len(task.labels),
                    "next": f"{self.url}/api/labels?page={page + 1}&task_id={task.id}" if more else None,
                    "previous": f"{self.url}/api/labels?page={page - 1}&task_id={task.id}"
                    if page > 1
                    else None,
                    "results": [self._label_json(task, label) for label in labels],
                },
            )
        found = re.fullmatch(r"/api/tasks/(\d+)(/.*)?", path)
        if found is None:
            return handler.reply(404, {"detail": "Not found."})
        task = self.tasks.get(int(found[1]))
        if task is None:
            return handler.reply(404, {"detail": "Not found."})
        rest = found[2] or ""
        if (method, rest) == ("GET", ""):
            return handler.reply(200, self._task_json(task))
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
            if method == "PATCH" and query.get("action") != ["create"]:
                return handler.reply(400, {"detail": "Only action=create is emulated."})
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
