"""The routing key of a request: the image it is about, as the worker replicas will name it. No Ray here, so
the rule is tested without a cluster.

The key is the image's content id (sha256 of the file bytes, server.inputs.images.image_id) whenever the body
carries the bytes or an `image_id`, so the click that sends an image and the clicks that name it by id land on
the same replica. An image given by URL is keyed by its URL: its bytes are fetched by the worker, not here.
"""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import HTTP

import orjson

from server.errors import ApiError
from server.inputs.images import image_id
from server.inputs.urls import decode_base64

RAW_TYPES = ("image/", "application/octet-stream")
JOBS_KEY = "jobs"  # every job request goes to one replica: its ledger lives there (see docs/scale-out.md)


def routing_key(method: str, path: str, content_type: str, body: bytes) -> str | None:
    """The image key of a request, or None when it names no image (it may go to any replica). Never raises:
    a malformed body gets no key, and the worker that serves it answers with the usual 4xx."""
    if path.startswith("/v1/jobs"):
        return JOBS_KEY
    if method != "POST" or not body:
        return None
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/json":
        return _json_key(body)
    if kind == "multipart/form-data":
        return _multipart_key(content_type, body)
    if kind.startswith(RAW_TYPES):
        return image_id(body)
    return None


def _json_key(body: bytes) -> str | None:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    named = document.get("image_id")
    if isinstance(named, str) and named:
        return named
    image = document.get("image")
    if isinstance(image, str):  # CVAT's Nuclio invocations: the frame's base64
        return _base64_key(image)
    if isinstance(image, dict):  # ImageRef
        if isinstance(image.get("base64"), str):
            return _base64_key(image["base64"])
        if isinstance(image.get("url"), str):
            return "url:" + image["url"]
    return None


def _base64_key(text: str) -> str | None:
    try:
        return image_id(decode_base64(text))
    except ApiError:
        return None


def _multipart_key(content_type: str, body: bytes) -> str | None:
    """The content id of the 'file' part, or the `image_id` inside the JSON parts when there is no file."""
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        return None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        if name == "file" and payload:
            return image_id(payload)
        if payload.lstrip().startswith(b"{"):
            key = _json_key(payload)
            if key is not None:
                return key
    return None


TRACKING_PATHS = ("/v1/track/", "/api/function_invocations")  # where a JSON body may carry tracking states


def tracking_states(path: str, content_type: str, body: bytes) -> list[str]:
    """The tracking state ids a JSON request continues (a step), or a reply returns (an init); [] for any
    other request. They live in the memory of the replica that created them."""
    if (
        not path.startswith(TRACKING_PATHS)
        or content_type.split(";")[0].strip().lower() != "application/json"
    ):
        return []
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    states = document.get("states") if isinstance(document, dict) else None
    return [s for s in states if isinstance(s, str)] if isinstance(states, list) else []


PREFETCH = "/v1/prefetch"


def pinned_names(path: str, content_type: str, body: bytes) -> list[str]:
    """What a request names that lives in one replica's memory: tracking states, or a prefetch run by id."""
    if path.startswith(PREFETCH + "/"):
        return ["prefetch/" + path.removeprefix(PREFETCH + "/").split("/")[0]]
    return tracking_states(path, content_type, body)


def created_names(method: str, path: str, content_type: str, body: bytes) -> list[str]:
    """What a successful reply created in the replica that sent it: tracking states, or a prefetch run."""
    if method == "POST" and path.rstrip("/") == PREFETCH:
        try:
            run = orjson.loads(body)
        except orjson.JSONDecodeError:
            return []
        return ["prefetch/" + run["id"]] if isinstance(run, dict) and isinstance(run.get("id"), str) else []
    return tracking_states(path, content_type, body)
