"""CVAT tasks through cvat-sdk: connecting, reading a task's frames, and checking that a detector's labels map
onto a task's labels before a job starts.

Frames of a task whose data lives in a cloud storage (an S3-compatible bucket such as Backblaze B2) are read
straight from the bucket when one of this server's storage profiles serves it: the task's frame names are
the objects' keys (CVAT resolved them through the storage's manifest.jsonl when the task was made), and the
bytes are the very bytes CVAT sends to its functions. Otherwise, and for any frame the bucket fails to
give, frames come through CVAT's API (original quality).

Every problem a client can fix is an ApiError: 400 for an unreachable server, refused credentials or an
unknown task, 422 `label_mapping` for labels that do not match, 400 `unmatched_frames` for images without a
frame. The engine turns the same errors into a job failure when they happen while a job runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from models.detector import DetectorInfo
from server.cvat.spec import CvatConnection, CvatTaskOutput, CvatTaskSource, server_key
from server.errors import ApiError
from server.formats.cvat_json import LABEL_TYPES
from server.inputs.objectstore.locations import S3Url, profile_for
from server.inputs.objectstore.store import store_for
from server.settings import Settings

log = logging.getLogger("labelserve.jobs.cvat")

FRAME_REF = "cvat-task:{task_id}/frame/{index}"  # an item's ref; not a path or URL any other reader takes
NAMES_SHOWN = 20  # names listed in an error message


# -- connecting ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Login:
    """Where and how to log in, with the profile (if any) resolved."""

    url: str
    token: str | None = field(repr=False)
    username: str | None
    password: str | None = field(repr=False)
    organization: str | None

    @classmethod
    def of(cls, connection: CvatConnection, settings: Settings) -> Login:
        if connection.secrets_missing():
            raise ApiError(
                400,
                "cvat_credentials",
                "The job's CVAT credentials are no longer stored (they are forgotten when a job completes "
                "or is cancelled); submit the job again.",
            )
        if connection.profile is None:
            assert connection.url is not None
            return cls(
                url=connection.url,
                token=_secret(connection.token),
                username=connection.username,
                password=_secret(connection.password),
                organization=connection.organization,
            )
        profile = settings.cvat_profiles.get(connection.profile)
        if profile is None:
            known = ", ".join(sorted(settings.cvat_profiles)) or "none"
            raise ApiError(
                400,
                "cvat_profile",
                f"This server has no CVAT profile {connection.profile!r} "
                f"(LABELSERVE_CVAT_PROFILES has: {known}).",
            )
        if connection.url and server_key(connection.url) != server_key(profile.url):
            # The profile's credentials go to the profile's server only, never to a URL from the request.
            raise ApiError(
                400,
                "cvat_profile",
                f"CVAT profile {connection.profile!r} is for {profile.url}, not {connection.url}; "
                "leave out url.",
            )
        return cls(
            url=profile.url,
            token=_secret(profile.token),
            username=profile.username,
            password=_secret(profile.password),
            organization=connection.organization or profile.organization,
        )


@dataclass(frozen=True)
class Frame:
    index: int  # the task-relative frame number annotations refer to
    name: str
    width: int
    height: int


@dataclass
class TaskInfo:
    """A task as a job needs it: the cvat-sdk proxy, its labels, its (not deleted) frames."""

    task: Any  # cvat_sdk.core.proxies.tasks.Task
    url: str
    labels: list[Any] = field(default_factory=list)  # top-level cvat_sdk.models.Label, sublabels nested
    frames: list[Frame] = field(default_factory=list)

    @property
    def id(self) -> int:
        return int(self.task.id)

    def describe(self) -> str:
        return f"CVAT task {self.id} at {self.url}"


class Connections:
    """cvat-sdk clients opened for one submit or one run, one per server and login, closed together.

    Clients are shared by the reader threads: cvat-sdk's urllib3 pool is thread-safe, and its TaskDataset
    downloads with several threads on one client too."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._clients: dict[Login, Any] = {}
        self._tasks: dict[tuple[Login, int], TaskInfo] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        self._tasks.clear()

    def task(self, ref: CvatTaskSource | CvatTaskOutput) -> TaskInfo:
        """The task, its labels and its frames, fetched once per Connections."""
        assert ref.task_id is not None
        login = Login.of(ref, self._settings)
        key = (login, ref.task_id)
        if key not in self._tasks:
            client = self._client(login)
            url = client.api_map.host
            with cvat_errors(f"reading task {ref.task_id}", url, task_id=ref.task_id):
                task = client.tasks.retrieve(ref.task_id)
                info = TaskInfo(task, url)
                if getattr(task, "dimension", "2d") != "2d":
                    raise ApiError(400, "cvat_unsupported_task", f"{info.describe()} is a 3D task.")
                if not task.size:
                    raise ApiError(400, "cvat_task_empty", f"{info.describe()} has no data.")
                info.labels = [label for label in task.get_labels() if not _is_sublabel(label)]
                info.frames = _frames(task, task.get_meta())
            self._tasks[key] = info
        return self._tasks[key]

    def source_frames(self, source: CvatTaskSource) -> list[tuple[str, str]]:
        """(ref, name) of every frame of a source task, in frame order."""
        info = self.task(source)
        return [(FRAME_REF.format(task_id=info.id, index=f.index), frame_name(f.name)) for f in info.frames]

    def frame_reader(self, source: CvatTaskSource) -> Callable[[str], bytes]:
        """Reads an item's frame (original quality) by its ref; errors become the item's failure reason."""
        info = self.task(source)
        prefix = FRAME_REF.format(task_id=info.id, index="")
        bucket = self._task_bucket(source, info)
        names = {frame.index: frame.name for frame in info.frames}

        def read(ref: str) -> bytes:
            if not ref.startswith(prefix):
                raise ApiError(400, "unsupported_source", f"{ref!r} is not a frame of {info.describe()}.")
            index = int(ref[len(prefix) :])
            if bucket is not None and index in names:
                try:
                    return store_for(self._settings).read(str(S3Url(bucket, names[index])), "job")
                except ApiError as exc:
                    log.warning("%s frame %d from s3://%s: %s; through CVAT instead", info.describe(), index,
                                bucket, exc.message)  # fmt: skip
            with cvat_errors(f"downloading frame {index}", info.url, task_id=info.id):
                return info.task.get_frame(index, quality="original").getvalue()

        return read

    def _task_bucket(self, source: CvatTaskSource, info: TaskInfo) -> str | None:
        """The bucket of the task's cloud storage when a storage profile of this server serves it at the same
        endpoint; None reads through CVAT."""
        storage_id = getattr(info.task, "data_cloud_storage_id", None)
        if storage_id is None or info.task.data_original_chunk_type != "imageset":
            return None
        client = self._client(Login.of(source, self._settings))
        try:
            with cvat_errors(f"reading cloud storage {storage_id}", info.url):
                storage = client.api_client.cloudstorages_api.retrieve(storage_id)[0]
        except ApiError as exc:  # e.g. the user may see the task but not its storage
            log.info("%s: its cloud storage is not readable (%s); frames through CVAT", info.describe(),
                     exc.message)  # fmt: skip
            return None
        if str(storage.provider_type) != "AWS_S3_BUCKET":
            return None
        try:
            _, profile = profile_for(S3Url(storage.resource, info.frames[0].name), self._settings)
        except (ApiError, IndexError):
            return None  # no profile serves that bucket (or prefix): CVAT serves the frames
        endpoint = parse_qs(str(storage.specific_attributes or "")).get("endpoint_url", [""])[0]
        if endpoint and _endpoint(endpoint) != _endpoint(profile.endpoint_url):
            return None  # the same bucket name at another S3 service
        return str(storage.resource)

    def client(self, connection: CvatConnection) -> Any:
        """A logged-in cvat-sdk client for `connection` (shared with the tasks read through it)."""
        return self._client(Login.of(connection, self._settings))

    def client_for_profile(self, profile: str, organization: str | None = None) -> Any:
        """A logged-in cvat-sdk client for a server profile, in `organization`'s context (else the profile's);
        for callers that use CVAT's API beyond tasks (e.g. registering webhooks)."""
        connection = CvatConnection(profile=profile, organization=organization)
        return self._client(Login.of(connection, self._settings))

    def _client(self, login: Login) -> Any:
        if login in self._clients:
            return self._clients[login]
        try:
            from cvat_sdk.core.client import AccessTokenCredentials, Client, Config, PasswordCredentials
            from cvat_sdk.core.exceptions import InvalidHostException
        except ImportError:
            raise ApiError(
                503,
                "cvat_unavailable",
                "CVAT tasks need cvat-sdk on this server: pip install 'labelserve[cvat]'.",
            ) from None

        try:
            config = Config(verify_ssl=self._settings.cvat_verify_ssl)
            client = Client(login.url, config=config, check_server_version=False, logger=log)
        except InvalidHostException as exc:
            raise ApiError(400, "cvat_unreachable", f"{login.url!r} is not a CVAT address: {exc}") from None
        _set_timeout(client, self._settings.cvat_timeout_s)
        url = client.api_map.host
        with cvat_errors("asking for its version", url):
            client.get_server_version()  # unauthenticated: tells "unreachable" apart from "refused"
        with cvat_errors("logging in", url, login=True):
            if login.token is not None:
                client.login(AccessTokenCredentials(login.token))
            else:
                assert login.username is not None and login.password is not None
                try:
                    client.login(PasswordCredentials(login.username, login.password))
                except AssertionError:  # cvat-sdk checks that the login set CVAT's session cookies
                    raise ApiError(
                        502, "cvat_error", f"CVAT at {url} accepted the login but opened no session."
                    ) from None
        if login.organization is not None:
            client.organization_slug = login.organization
        self._clients[login] = client
        return client


def _endpoint(url: str) -> tuple[str, str]:
    parts = urlsplit(url if "://" in url else f"https://{url}")
    return parts.scheme.lower(), parts.netloc.lower()


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


def frame_name(name: str) -> str:
    """A frame name as an output name: only its plain segments, so it never climbs out of the directory."""
    return "/".join(s for s in name.replace("\\", "/").split("/") if s not in ("", ".", "..")) or "frame"


def _is_sublabel(label: Any) -> bool:
    return bool(getattr(label, "has_parent", False) or getattr(label, "parent_id", None))


def _frames(task: Any, meta: Any) -> list[Frame]:
    """Frames in task order, deleted ones left out. Video frames are named frame_000000, … as CVAT exports
    them; every video frame has the size of the first."""
    deleted = set(meta.deleted_frames or ())
    entries = meta.frames or []
    imageset = task.data_original_chunk_type == "imageset"
    frames = []
    for index in range(task.size):
        if index in deleted:
            continue
        entry = entries[index if imageset else 0]
        name = entry.name if imageset else f"frame_{index:06d}"
        frames.append(Frame(index, name, int(entry.width), int(entry.height)))
    return frames


def _set_timeout(client: Any, seconds: float) -> None:
    """cvat-sdk has no client-wide timeout and its task methods take none, so a CVAT that stops answering
    would hang a job forever; give every request of this client one."""
    rest = client.api_client.rest_client
    request = rest.request

    def with_timeout(*args: Any, _request_timeout: Any = None, **kwargs: Any) -> Any:
        return request(*args, _request_timeout=_request_timeout or seconds, **kwargs)

    rest.request = with_timeout


@contextlib.contextmanager
def cvat_errors(doing: str, url: str, *, task_id: int | None = None, login: bool = False) -> Iterator[None]:
    """cvat-sdk and urllib3 errors as ApiErrors a client can act on."""
    import urllib3
    from cvat_sdk.api_client.exceptions import ApiException, OpenApiException

    where = f"CVAT at {url}"
    try:
        yield
    except ApiError:
        raise
    except ApiException as exc:
        detail = _body(exc)
        status = exc.status or 0
        if status == 401 or (login and status in (400, 403)):
            raise ApiError(
                400,
                "cvat_auth_failed",
                f"{where} refused the credentials while {doing} (HTTP {status}{detail}); check the token, or "
                "the username and password.",
            ) from None
        if status in (403, 404) and task_id is not None:
            code, what = (
                ("cvat_forbidden", "does not let this user see")
                if status == 403
                else (
                    "cvat_task_not_found",
                    "has no",
                )
            )
            hint = "" if status == 403 else " (or the user cannot see it: set organization for a task in one)"
            raise ApiError(400, code, f"{where} {what} task {task_id}{hint}.") from None
        code = "cvat_error" if status >= 500 else "cvat_rejected"  # only the first is worth retrying
        raise ApiError(502, code, f"{where} answered HTTP {status} while {doing}{detail}.") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ApiError(400, "cvat_unreachable", f"Cannot reach {where} while {doing}: {reason}.") from None
    except OpenApiException as exc:  # a reply cvat-sdk's models reject: not a CVAT it understands
        raise ApiError(502, "cvat_error", f"{where} sent an unexpected reply while {doing}: {exc}") from None


def _body(exc: Any) -> str:
    body = exc.body.decode("utf-8", "replace") if isinstance(exc.body, bytes) else str(exc.body or "")
    body = " ".join(body.split())
    return f": {body[:300]}" if body else ""


# -- labels ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelTarget:
    """The CVAT label a model label uploads to."""

    id: int
    name: str
    type: str  # the CVAT label's type: any, rectangle, mask, polygon, skeleton, tag, ...
    points: dict[str, int] = field(default_factory=dict)  # skeletons: model keypoint name → CVAT sublabel id


@dataclass(frozen=True)
class LabelPlan:
    targets: dict[str, LabelTarget]  # model label → CVAT label; a model label not here is dropped
    conv_mask_to_poly: bool


def produced_type(info: DetectorInfo, sam_refine: str | None) -> str:
    """The CVAT shape type a job's detections become (SAM refinement turns boxes into masks)."""
    produced = LABEL_TYPES[info.task]
    return "mask" if sam_refine is not None and info.task == "detect" else produced


def fits(shape_type: str, label_type: str) -> bool:
    """CVAT's rule (cvat-sdk's _AnnotationMapper): a label of type `any` takes anything but a skeleton."""
    return label_type == shape_type or (label_type == "any" and shape_type != "skeleton")


_KINDS = {
    "rectangle": "boxes",
    "mask": "masks",
    "polygon": "polygons",
    "skeleton": "skeletons",
    "tag": "tags",
}
_FIX = {
    "rectangle": "a rectangle or any label",
    "mask": "a mask or any label (or polygon with conv_mask_to_poly)",
    "polygon": "a polygon or any label",
    "skeleton": "a skeleton label whose points are the model's keypoints",
    "tag": "a tag or any label",
}


def plan_labels(
    info: DetectorInfo,
    sam_refine: str | None,
    classes: Sequence[int] | None,
    output: CvatTaskOutput,
    task: TaskInfo,
) -> LabelPlan:
    """Map the detector's labels onto the task's, or raise ApiError 422 `label_mapping` naming every problem
    and how to fix it."""
    produced = produced_type(info, sam_refine)
    if produced == "mask" and output.conv_mask_to_poly:
        produced = "polygon"
    model_labels = [
        name for class_id, name in sorted(info.class_names.items()) if not classes or class_id in classes
    ]
    cvat_labels = {label.name: label for label in task.labels}
    problems: list[str] = []

    unknown = sorted(set(output.label_map) - set(info.class_names.values()))
    if unknown:
        problems.append(
            f"label_map names {_names(unknown)}, which {_is_are(unknown)} not a label of {info.name!r} "
            f"(it has {_names(info.class_names.values())})."
        )
    targets: dict[str, LabelTarget] = {}
    unmatched: list[str] = []
    for name in model_labels:
        wanted = output.label_map.get(name, name)
        if wanted is None:  # dropped on purpose
            continue
        label = cvat_labels.get(wanted)
        if label is None:
            unmatched.append(name)
            continue
        label_type = str(label.type)
        if not fits(produced, label_type):
            problems.append(
                f"CVAT label {wanted!r} is a {label_type} label, but {info.name!r} produces "
                f"{_KINDS[produced]} for {name!r}: map it to {_FIX[produced]}."
            )
            continue
        points: dict[str, int] = {}
        if produced == "skeleton":
            sublabels = {sub.name: int(sub.id) for sub in label.sublabels}
            missing = [s for s in sublabels if s not in info.keypoint_names]
            extra = [k for k in info.keypoint_names if k not in sublabels]
            if missing:
                problems.append(
                    f"CVAT skeleton {wanted!r} has points {_names(missing)} that {info.name!r} does not "
                    f"produce (it has {_names(info.keypoint_names)}); CVAT needs every point of a skeleton."
                )
            if extra and not output.allow_unmatched:
                problems.append(
                    f"CVAT skeleton {wanted!r} has no points {_names(extra)}; add them, or set "
                    "allow_unmatched to leave them out."
                )
            points = {k: sublabels[k] for k in info.keypoint_names if k in sublabels}
        targets[name] = LabelTarget(int(label.id), wanted, label_type, points)

    if unmatched and not output.allow_unmatched:
        example = {unmatched[0]: next(iter(cvat_labels), "a CVAT label")}
        problems.insert(
            0,
            f"No CVAT label for the model labels {_names(unmatched)} ({task.describe()} has "
            f"{_names(cvat_labels) if cvat_labels else 'no labels'}). Map them with "
            f"output.cvat_task.label_map, e.g. {json.dumps(example)} (CLI: --label-map MODEL=CVAT), or set "
            "allow_unmatched to drop their detections (CLI: --allow-unmatched), or keep only the classes you "
            "need with params.classes.",
        )
    if not problems and not targets:
        problems.append(
            f"None of {info.name!r}'s labels maps to a label of {task.describe()}: nothing to upload."
        )
    if problems:
        raise ApiError(422, "label_mapping", " ".join(problems))
    return LabelPlan(targets, output.conv_mask_to_poly)


def _names(names: Iterable[str]) -> str:
    listed = list(names)
    shown = ", ".join(repr(n) for n in listed[:NAMES_SHOWN])
    return shown + (f" and {len(listed) - NAMES_SHOWN} more" if len(listed) > NAMES_SHOWN else "")


def _is_are(names: Sequence[str]) -> str:
    return "is" if len(names) == 1 else "are"


# -- frames ----------------------------------------------------------------------------------------------


def match_frames(names: Iterable[str], task: TaskInfo) -> dict[str, Frame]:
    """Image name → the task's frame of that name: the same relative path, else the only frame with that file
    name. Raises ApiError 400 `unmatched_frames` listing the images without one."""
    by_path = {frame.name: frame for frame in task.frames}
    by_file: dict[str, list[Frame]] = {}
    for frame in task.frames:
        by_file.setdefault(posixpath.basename(frame.name), []).append(frame)
    matched: dict[str, Frame] = {}
    unmatched: list[str] = []
    taken: dict[int, str] = {}
    for name in names:
        frame = by_path.get(name)
        if frame is None:
            candidates = by_file.get(posixpath.basename(name), [])
            frame = candidates[0] if len(candidates) == 1 else None
        if frame is None or frame.index in taken:
            unmatched.append(name)
            continue
        taken[frame.index] = name
        matched[name] = frame
    if unmatched:
        examples = _names(frame.name for frame in task.frames[:5])
        raise ApiError(
            400,
            "unmatched_frames",
            f"{len(unmatched)} images have no frame in {task.describe()}: {_names(unmatched)}. Images are "
            "matched to frames by relative path, then by a file name only one frame has; the task's frames "
            f"are named like {examples}.",
        )
    return matched


# -- a job's CVAT checks ---------------------------------------------------------------------------------


@dataclass
class Prepared:
    """What the checks found: the source's entries (for a CVAT source), the output task."""

    entries: list[tuple[str, str]] | None = None
    output: TaskInfo | None = None


def prepare(
    connections: Connections,
    info: DetectorInfo,
    sam_refine: str | None,
    classes: Sequence[int] | None,
    source: CvatTaskSource | None,
    output: CvatTaskOutput | None,
) -> Prepared:
    """Connect, list the source task's frames and check the output task's labels (ApiError otherwise)."""
    prepared = Prepared()
    if source is not None:
        prepared.entries = connections.source_frames(source)
    if output is not None:
        prepared.output = connections.task(output)
        plan_labels(info, sam_refine, classes, output, prepared.output)  # raises when the labels do not map
    return prepared
