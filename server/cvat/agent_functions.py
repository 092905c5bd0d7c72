"""CVAT AI-agent functions (CVAT Enterprise/Online) backed by a labelserve server.

The agent stays thin: models and the embedding cache stay on the labelserve (GPU) host. This file imports only
cvat-sdk, httpx and Pillow, so it can be loaded with `--function-file` from any machine that runs cvat-cli:

    cvat-cli function create-native "labelserve SAM" --function-file agent_functions.py \\
        -p url=str:http://labelserve:8080 -p model=str:mobile_sam
    cvat-cli function run-agent <FUNCTION_ID> --function-file agent_functions.py \\
        -p url=str:http://labelserve:8080 -p model=str:mobile_sam

`create` returns a DetectionFunction for detector models (YOLO), an InteractionFunction for SAM models, and a
TrackingFunction when given `-p tracker=str:NAME` (a name from GET /v1/trackers).

Look-ahead: with `-p lookahead=int:K -p cvat_profile=str:NAME` (a CVAT profile of the labelserve server, for
this CVAT), the first click on frame N of a task asks labelserve to embed frames N+1 … N+K of that task in
the background, so the next frames' first clicks are cache hits.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import threading
from typing import Any, NamedTuple

import cvat_sdk.auto_annotation as cvataa
import httpx
import PIL.Image
from cvat_sdk import models

log = logging.getLogger("labelserve.agent")


class LabelserveError(RuntimeError):
    """labelserve refused a request; the message is its explanation, which the agent reports to CVAT."""


class EmbeddedImage(NamedTuple):
    """What preprocess_image hands to detect: the server's image id, and the bytes to re-send if the server
    evicted the embedding meanwhile (the agent caches this for 10 minutes).

    Not a dataclass: cvat-cli's --function-file loader runs this file as a module missing from sys.modules,
    where dataclasses cannot resolve postponed annotations."""

    image_id: str
    png: bytes


class InteractionFunction:
    """SAM clicks: preprocess_image uploads the frame once; each detect sends only the prompts."""

    def __init__(
        self,
        url: str,
        model: str = "mobile_sam",
        api_key: str = "",
        timeout: float = 120.0,
        lookahead: int = 0,
        cvat_profile: str = "",
    ) -> None:
        self.model = model
        self._http = _client(url, api_key, timeout)
        # Box-only and point-only prompts both work; negative points are allowed.
        self.spec = cvataa.InteractionFunctionSpec(min_pos_points=0, min_neg_points=0, min_bounding_boxes=0)
        if lookahead and not cvat_profile:
            raise LabelserveError(
                "lookahead needs cvat_profile: the labelserve server's CVAT profile for this CVAT"
            )
        self.lookahead, self.cvat_profile = lookahead, cvat_profile
        if lookahead and not _watch_frames():
            log.warning("this cvat-cli does not tell functions their frame: look-ahead is off")
            self.lookahead = 0

    def preprocess_image(
        self, context: cvataa.InteractionFunctionContext, image: PIL.Image.Image
    ) -> EmbeddedImage:
        # Called once per frame the agent sees (it caches the result): the moment to warm the next frames.
        frame = _current_frame() if self.lookahead else None
        if frame is not None:
            self._ask_lookahead(*frame)
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG", compress_level=1)  # lossless, fast to write
        png = buffer.getvalue()
        # labelserve finds a frame it prefetched from the original file by its pixels (one decode, no encode).
        return EmbeddedImage(self._embed(png), png)

    def _ask_lookahead(self, task_id: int, frame: int) -> None:
        """In the background: the click does not wait for labelserve to queue the run."""
        body = {"profile": self.cvat_profile, "task_id": task_id, "frame": frame, "count": self.lookahead,
                "model": self.model}  # fmt: skip

        def send() -> None:
            try:
                _json(self._http.post("/v1/cvat/lookahead", json=body, timeout=10.0))
            except (LabelserveError, httpx.HTTPError) as exc:
                log.warning("look-ahead from frame %d of task %d: %s", frame, task_id, exc)

        threading.Thread(target=send, name="labelserve-lookahead", daemon=True).start()

    def detect(
        self,
        context: cvataa.InteractionFunctionContext,
        pp_image: EmbeddedImage,
        prompts: cvataa.InteractionPrompts,
    ) -> list[cvataa.InteractionResultShape]:
        body: dict[str, Any] = {
            "image_id": pp_image.image_id,
            "points": [list(p) for p in (*prompts.pos_points, *prompts.neg_points)],
            "labels": [1] * len(prompts.pos_points) + [0] * len(prompts.neg_points),
            "formats": ["cvat"],
        }
        if prompts.bounding_box is not None:
            (x1, y1), (x2, y2) = prompts.bounding_box
            body["box"] = [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]
        response = self._http.post(f"/v1/sam/{self.model}/segment", json=body)
        if _error_code(response) == "image_not_cached":  # evicted on the server: send the frame once more
            self._embed(pp_image.png)
            response = self._http.post(f"/v1/sam/{self.model}/segment", json=body)
        masks = _json(response)["masks"]
        return [
            cvataa.InteractionResultShape(
                type="mask",
                points=mask["cvat"],
                attributes=[
                    models.AttributeValRequest(
                        spec_id=cvataa.InteractionResultAttributes.CONFIDENCE,
                        value=f"{min(max(mask['score'], 0.0), 1.0):.4f}",
                    )
                ],
            )
            for mask in masks
            if mask["area"] > 0
        ]

    def _embed(self, png: bytes) -> str:
        response = self._http.post(
            f"/v1/sam/{self.model}/embed", content=png, headers={"content-type": "image/png"}
        )
        return _json(response)["image_id"]


class DetectionFunction:
    """Any labelserve detector: each frame is sent once; the reply is mapped onto CVAT's label spec."""

    def __init__(
        self, url: str, model: str, api_key: str = "", timeout: float = 120.0, tile: int = 0
    ) -> None:
        self.model = model
        self.tile = tile  # > 0: sliced detection with tiles of this side (large images)
        self._http = _client(url, api_key, timeout)
        description = _describe(self._http, model)
        self.task: str = description["task"]
        self._ids = {name: int(class_id) for class_id, name in description["classes"].items()}
        self._keypoints: list[str] = description.get("keypoints") or []
        self.spec = cvataa.DetectionFunctionSpec(labels=[self._label(n, i) for n, i in self._ids.items()])

    def _label(self, name: str, label_id: int) -> models.PatchedLabelRequest:
        return label_spec(self.task, name, label_id, self._keypoints)

    def detect(self, context: cvataa.DetectionFunctionContext, image: PIL.Image.Image) -> list[Any]:
        params: dict[str, Any] = {"format": "internal", "mask_formats": ["cvat", "polygons"]}
        if context.conf_threshold is not None:
            params["conf"] = context.conf_threshold
        if self.tile > 0:
            params["tile"] = self.tile
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG", compress_level=1)
        response = self._http.post(
            f"/v1/detect/{self.model}",
            files={"file": ("frame.png", buffer.getvalue(), "image/png")},
            data={"params": json.dumps(params)},
        )
        return [
            out
            for shape in _json(response)["shapes"]
            if (out := self._convert(shape, context.conv_mask_to_poly)) is not None
        ]

    def _convert(self, shape: dict[str, Any], mask_to_polygon: bool) -> Any:
        return cvat_annotation(shape, self._ids[shape["label"]], mask_to_polygon)


def label_spec(task: str, name: str, label_id: int, keypoints: list[str]) -> models.PatchedLabelRequest:
    """The cvat-sdk label spec of one class of a model doing `task` (an Ultralytics task name)."""
    if task == "pose":
        points = [cvataa.keypoint_spec(point, i) for i, point in enumerate(keypoints)]
        return cvataa.skeleton_label_spec(name, label_id, points)
    label_type = {"segment": "mask", "classify": "tag"}.get(task, "rectangle")
    return cvataa.label_spec(name, label_id, type=label_type)


def cvat_annotation(shape: dict[str, Any], label_id: int, mask_to_polygon: bool) -> Any:
    """One labelserve shape (its /v1/detect JSON with the "cvat" and "polygons" mask formats) as a cvat-sdk
    tag or shape with `label_id`, frame 0 and skeleton elements numbered by keypoint position; None for what
    CVAT cannot hold (an empty mask; a mask without outline when polygons are asked for). Also used by the
    job engine's uploads into CVAT tasks, so both paths follow the same conventions."""
    kind = shape["kind"]
    if kind == "box":
        return cvataa.rectangle(label_id, shape["box"])
    if kind == "rotated_box":
        return cvataa.rectangle(label_id, shape["box"], rotation=shape["rotation"] % 360.0)
    if kind == "mask":
        if mask_to_polygon:  # CVAT asked for polygons: masks are not allowed in the reply
            polygons = shape["mask"]["polygons"]
            return cvataa.polygon(label_id, polygons[0]) if polygons else None
        return cvataa.mask(label_id, shape["mask"]["cvat"]) if shape["mask"]["area"] else None
    if kind == "keypoints":
        elements = [
            cvataa.keypoint(i, [point["x"], point["y"]], outside=not point["visible"])
            for i, point in enumerate(shape["keypoints"])
        ]
        return cvataa.skeleton(label_id, elements)
    if kind == "polygon":
        return cvataa.polygon(label_id, shape["polygon"])
    return cvataa.tag(label_id)


class TrackingFunction:
    """A labelserve tracker for the agent. The agent keeps each object's state, which here is only the id of
    the state labelserve keeps; every call sends the frame as PNG."""

    def __init__(self, url: str, tracker: str, api_key: str = "", timeout: float = 120.0) -> None:
        self.tracker = tracker
        self._http = _client(url, api_key, timeout)
        found = {t["name"]: t for t in _json(self._http.get("/v1/trackers"))["trackers"]}
        if tracker not in found:
            raise LabelserveError(f"labelserve has no tracker {tracker!r}; it has {sorted(found)}")
        accepts = found[tracker]["accepts"]
        types = [cvat for cvat, ours in _TRACKABLE.items() if ours in accepts]
        self.spec = cvataa.TrackingFunctionSpec(supported_shape_types=types)

    def preprocess_image(self, context: cvataa.TrackingFunctionContext, image: PIL.Image.Image) -> bytes:
        # Always defined: cvat-cli 2.80 calls it on every track request without checking that it exists.
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    def init_tracking_state(
        self, context: cvataa.TrackingFunctionShapeContext, pp_image: bytes, shape: cvataa.TrackableShape
    ) -> str:
        params = {"shapes": [{"type": shape.type, "points": [float(v) for v in shape.points]}]}
        return self._call("", pp_image, params)["states"][0]

    def track(
        self, context: cvataa.TrackingFunctionShapeContext, pp_image: bytes, state: str
    ) -> cvataa.TrackableShape | None:
        found = self._call("/step", pp_image, {"states": [state]})["shapes"][0]
        return None if found is None else cvataa.TrackableShape(type=found["type"], points=found["points"])

    def _call(self, path: str, png: bytes, params: dict[str, Any]) -> dict[str, Any]:
        response = self._http.post(
            f"/v1/track/{self.tracker}{path}",
            files={"file": ("frame.png", png, "image/png")},
            data={"params": json.dumps(params)},
        )
        return _json(response)


_TRACKABLE = {"rectangle": "box", "polygon": "polygon", "mask": "mask"}


def _client(url: str, api_key: str, timeout: float) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url.rstrip("/"), timeout=timeout, headers=headers)


def _describe(http: httpx.Client, model: str) -> dict[str, Any]:
    for description in _json(http.get("/v1/models"))["models"]:
        if description["name"] == model:
            if description["state"] != "loaded":
                raise LabelserveError(
                    f"labelserve model {model!r} is {description['state']}: {description['message']}"
                )
            return description
    raise LabelserveError(f"labelserve has no model {model!r}")


def _error_code(response: httpx.Response) -> str | None:
    if response.is_success:
        return None
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def _json(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json()
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    raise LabelserveError(f"labelserve answered HTTP {response.status_code}: {message}")


# cvat-cli hands interaction functions no frame number (InteractionFunctionContext is empty in 2.80), but its
# worker entry points receive each request's (task, frame, roi) as their cache key: wrapped, they record it
# for the look-ahead. The record lives on cvat-cli's module, which every load of this file shares; and
# functools.wraps keeps the entry points' names, so the agent still pickles them by reference.
_WORKER_ENTRY_POINTS = ("_worker_job_interact", "_worker_job_interact_from_cache")
_FRAME_ATTRIBUTE = "labelserve_frame"


def _driver() -> Any:
    try:
        from cvat_cli._internal import agent_driver_interaction
    except ImportError:
        return None
    return agent_driver_interaction


def _current_frame() -> tuple[int, int] | None:
    """(task id, frame) of the interaction request being served, when cvat-cli's entry points are watched."""
    return getattr(_driver(), _FRAME_ATTRIBUTE, None)


def _watch_frames() -> bool:
    """Wrap cvat-cli's interaction worker entry points (once); False when this cvat-cli has none."""
    driver = _driver()
    if driver is None or not all(hasattr(driver, name) for name in _WORKER_ENTRY_POINTS):
        return False
    for name in _WORKER_ENTRY_POINTS:
        original = getattr(driver, name)
        if getattr(original, "labelserve_watch", False):
            continue

        @functools.wraps(original)
        def watched(cache_key: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            try:
                frame = (int(cache_key[0]), int(cache_key[1]))
            except (TypeError, ValueError, IndexError):
                frame = None
            setattr(driver, _FRAME_ATTRIBUTE, frame)
            return _original(cache_key, *args, **kwargs)

        watched.labelserve_watch = True  # type: ignore[attr-defined]
        setattr(driver, name, watched)
    return True


def create(
    url: str,
    model: str = "mobile_sam",
    api_key: str = "",
    timeout: float = 120.0,
    tracker: str = "",
    tile: int = 0,
    lookahead: int = 0,
    cvat_profile: str = "",
) -> InteractionFunction | DetectionFunction | TrackingFunction:
    """Called by cvat-cli with the `-p NAME=TYPE:VALUE` parameters: `-p tracker=str:medianflow` (or
    `mobile_sam-propagate`, ...) makes a tracking function; otherwise the model's kind picks the function.
    `-p tile=int:640` makes a detector slice large images into tiles (the API's `tile`). For SAM models,
    `-p lookahead=int:4 -p cvat_profile=str:NAME` warms the 4 frames after each frame clicked on."""
    if tracker:
        return TrackingFunction(url, tracker=tracker, api_key=api_key, timeout=timeout)
    with _client(url, api_key, timeout) as http:
        description = _describe(http, model)
    # A concept model (SAM 3) is a detector of the server's vocabulary (its "classes").
    if description["kind"] == "detector" or "detector" in description.get("kinds", ()):
        return DetectionFunction(url, model=model, api_key=api_key, timeout=timeout, tile=tile)
    return InteractionFunction(
        url, model=model, api_key=api_key, timeout=timeout, lookahead=lookahead, cvat_profile=cvat_profile
    )
