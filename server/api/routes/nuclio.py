"""labelserve posing as the Nuclio dashboard, so CVAT Community's AI tools call it with no Nuclio install.

CVAT is pointed here with CVAT_NUCLIO_HOST/PORT and CVAT_NUCLIO_INVOKE_METHOD=dashboard; it lists functions
with GET /api/functions and invokes them with POST /api/function_invocations, naming the function in the
x-nuclio-function-name header (../shared/docs/cvat-protocols.md §A.1–A.6).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from models.detector import DetectParams
from models.sam import SAM_ARCHITECTURES
from server.api.body import read_limited_body
from server.api.deps import Services, ServicesDep
from server.errors import ApiError
from server.formats import cvat_json as render
from server.inputs.urls import decode_base64
from server.ops import request_context
from server.ops.timing import Timings
from server.schemas import SegmentRequest

router = APIRouter(tags=["cvat"])

BROWSER_SAM_ID = "pth-facebookresearch-sam-vit-h"  # the id CVAT's in-browser SAM decoder is wired to


@dataclass(frozen=True)
class NuclioFunction:
    """A cheap descriptor: listing and invoking look functions up often, so the label spec (up to thousands of
    classes) is only built when a config is served."""

    id: str
    kind: Literal["interactor", "detector", "tracker"]
    model: str
    browser: bool = False  # CVAT's in-browser SAM decoder, served embeddings instead of masks

    def config(self, svc: Services) -> dict[str, Any]:
        """Exactly the keys CVAT's LambdaFunction reads; every annotation value is a string."""
        if self.kind == "tracker":
            tracker = svc.track.tracker(self.model)
            name, description = (
                f"labelserve {self.model}",
                _TRACKER_DESCRIPTIONS.get("sam" if self.model.endswith("-propagate") else self.model, ""),
            )
            # CVAT Community lists only trackers that declare rectangle; polygon and mask are for Enterprise.
            types = ["rectangle", *(t for t in ("polygon", "mask") if _KIND[t] in tracker.accepts)]
            annotations = {"spec": "", "supported_shape_types": ",".join(types)}
        elif self.kind == "detector":
            info = svc.registry.detector(self.model).info
            name, description = f"labelserve {self.model}", f"Ultralytics {info.task} model {self.model}"
            if svc.registry.record(self.model).kind == "concept":
                description = (
                    f"SAM 3 concepts ({self.model}): every instance of the server's vocabulary, as "
                    f"{'masks' if info.task == 'segment' else 'boxes'}"
                )
            annotations = {"spec": json.dumps(render.label_spec(info), separators=(",", ":"))}
        elif self.browser:
            name = "Segment Anything"
            description = f"Embeddings for CVAT's browser SAM decoder, from labelserve ({self.model})"
            annotations = _INTERACTOR
        else:
            weights = svc.registry.record(self.model).weights
            clicks = self.id == clicks_function_id(self.model)
            name = f"labelserve {self.model}" + (" clicks" if clicks else "")
            description = f"Interactive segmentation with {self.model} ({weights}), embeddings cached"
            annotations = _INTERACTOR
        return {
            "metadata": {"name": self.id, "annotations": {"name": name, "type": self.kind, **annotations}},
            "spec": {"description": description},
            "status": {"state": "ready", "httpPort": svc.settings.port},
        }

    def invoke(self, svc: Services, payload: dict[str, Any]) -> Any:
        if self.kind == "tracker":
            return _track(svc, self, payload)
        if self.kind == "detector":
            return _detect(svc, self.model, payload)
        if self.browser:
            return _browser_embedding(svc, self.model, payload)
        return _interact(svc, self.model, payload)


def function_id(model: str) -> str:
    return "labelserve-" + model.replace("_", "-")


def clicks_function_id(model: str) -> str:
    """The interactor of a model whose own id is its detector function (SAM 3: concepts and clicks)."""
    return function_id(model) + "-clicks"


def tracker_function_id(tracker: str) -> str:
    return "labelserve-track-" + tracker.replace("_", "-")


_KIND = {"rectangle": "box", "polygon": "polygon", "mask": "mask"}
LEGACY = "legacy"  # CVAT's rectangle protocol: [x1, y1, x2, y2] lists, no supported_shape_types
_TRACKER_DESCRIPTIONS = {
    "medianflow": "Weight-free box tracker (Median Flow optical flow, re-finds objects after occlusions)",
    "sam": "SAM mask propagation: each frame is prompted with the previous mask; embeddings cached",
}


# Interactor annotations. Booleans are parsed by CVAT with bool(str), so "true" or absent, never "false".
_INTERACTOR = {
    "version": "2",
    "spec": "",
    "min_pos_points": "0",
    "min_neg_points": "0",
    "startswith_box_optional": "true",
    "help_message": "Click inside the object (and outside it to correct), or draw a box first. Every click "
    "after the first one on a frame is answered from labelserve's embedding cache.",
    "animated_gif": "",
}


def catalogue(svc: Services) -> dict[str, NuclioFunction]:
    """One function per loaded model, plus CVAT's browser-SAM id when its model is loaded. A model of two
    kinds (SAM 2: clicks and tracking) is an interactor here and a tracker among the trackers."""
    records = [r for r in svc.registry.describe() if r["state"] == "loaded"]
    loaded = {r["name"]: r["kind"] for r in records}
    functions = {
        function_id(model): NuclioFunction(
            function_id(model), "detector" if kind == "detector" else "interactor", model
        )
        for model, kind in loaded.items()
        if kind in ("detector", "segmenter")  # tracker models are listed below, with the other trackers
    }
    # A concept model (SAM 3) is a detector of the server's vocabulary, when it has one, and with a click head
    # also an interactor: CVAT wants one kind per function, so the clicks get a function of their own.
    for record in records:
        if record["kind"] != "concept":
            continue
        if "detector" in record["kinds"] and record.get("classes"):
            fid = function_id(record["name"])
            functions[fid] = NuclioFunction(fid, "detector", record["name"])
        if "segmenter" in record["kinds"]:
            fid = clicks_function_id(record["name"])
            functions[fid] = NuclioFunction(fid, "interactor", record["name"])
    for tracker in svc.track.names():
        fid = tracker_function_id(tracker)
        functions[fid] = NuclioFunction(fid, "tracker", tracker)
    browser_model = svc.settings.cvat_browser_sam_model
    # CVAT's browser decoder reads one SAM [1, 256, 64, 64] embedding: SAM 2's three tensors are not that.
    if any(r["name"] == browser_model and r["architecture"] in SAM_ARCHITECTURES for r in records):
        functions[BROWSER_SAM_ID] = NuclioFunction(BROWSER_SAM_ID, "interactor", browser_model, browser=True)
    return functions


# ---- payloads ------------------------------------------------------------------------------------
class InteractorPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")  # CVAT may add keys (threshold, text_prompts, ...)

    image: str = Field(description="base64 of the frame's original bytes")
    pos_points: list[tuple[float, float]]
    neg_points: list[tuple[float, float]]
    obj_bbox: list[tuple[float, float]] | None = None  # [[x1, y1], [x2, y2]]; CVAT's UI sends [] for none


def _parse(model: type[BaseModel], payload: dict[str, Any], what: str) -> Any:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise ApiError(422, "invalid_request", f"Not a valid {what} request: {problems}") from None


def _interact(svc: Services, model: str, payload: dict[str, Any]) -> dict[str, Any]:
    request = _parse(InteractorPayload, payload, "CVAT interactor")
    data = decode_base64(request.image)
    box = None
    if request.obj_bbox:
        if len(request.obj_bbox) != 2:
            raise ApiError(422, "bad_prompt", "obj_bbox must be [[x1, y1], [x2, y2]] or [].")
        (xa, ya), (xb, yb) = request.obj_bbox
        box = (min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb))
    # CVAT sends no frame id: the content hash of these bytes is the cache key, so the next click on the
    # same frame is a cache hit, and a click extending earlier ones reuses their logits.
    segment = SegmentRequest.model_validate(
        {
            "points": [*request.pos_points, *request.neg_points],
            "labels": [1] * len(request.pos_points) + [0] * len(request.neg_points),
            "box": box,
        },
        context={"upload": True},
    )
    prediction = svc.sam.predict(model, data, segment, Timings())
    if svc.settings.cvat_interactor_reply == "legacy":
        return render.legacy_interactor_reply(prediction.masks[0][0])
    return render.interactor_reply(prediction.masks)


class DetectorPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image: str = Field(description="base64 of the frame's original bytes")
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)  # sent only when truthy


def _detect(svc: Services, model: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
    request = _parse(DetectorPayload, payload, "CVAT detector")
    params = DetectParams(tile=svc.settings.cvat_detect_tile)
    if request.threshold:  # CVAT sends 0 for "no threshold"
        params = replace(params, conf=request.threshold)
    found = svc.detect.detect(model, decode_base64(request.image), params, None, Timings())
    return [render.detector_item(shape, svc.settings.polygon_tolerance) for shape in found.shapes]


class TrackerPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image: str = Field(description="base64 of the frame's original bytes")
    shapes: list[Any] = Field(default_factory=list)
    states: list[Any] = Field(default_factory=list)


def _track(svc: Services, fn: NuclioFunction, payload: dict[str, Any]) -> dict[str, Any]:
    """Both of CVAT's tracker protocols: shape dicts (supported_shape_types) or legacy [x1, y1, x2, y2] lists.
    Init: shapes given and no states (CVAT sends []). Continue: shapes all null, one state per object."""
    request = _parse(TrackerPayload, payload, "CVAT tracker")
    frame = svc.track.frame(decode_base64(request.image))
    height, width = frame.size
    scope = f"cvat:{fn.id}"
    states = [s for s in request.states if s is not None]
    if not states:
        legacy = any(isinstance(item, list) for item in request.shapes)
        items = [{"type": "rectangle", "points": s} if isinstance(s, list) else s for s in request.shapes]
        if not items or any(not isinstance(item, dict) for item in items):
            raise ApiError(
                422, "no_shapes", "A tracker call needs shapes to start from, or states to continue."
            )
        try:
            shapes = [render.trackable_to_shape(item, width, height) for item in items]
        except ValueError as exc:
            raise ApiError(422, "bad_track_shape", f"{exc}.") from None
        # A legacy object is answered in the legacy form on every later frame, so the state remembers it.
        answer_as = [LEGACY if legacy else item["type"] for item in items]
        new_states = svc.track.init(fn.model, frame, shapes, scope, answer_as)
        return {"shapes": request.shapes, "states": new_states}
    if len(states) != len(request.states) or any(not isinstance(s, str) for s in states):
        raise ApiError(422, "bad_track_state", "Every state must be the string id this tracker returned.")
    found = svc.track.step(frame, states, scope)
    replies: list[Any] = []
    for shape, kind in found:
        as_type = "rectangle" if kind == LEGACY else kind
        reply = render.shape_to_trackable(shape, as_type, svc.settings.polygon_tolerance) if shape else None
        replies.append(reply["points"] if kind == LEGACY and reply is not None else reply)
    return {"shapes": replies, "states": states}


def _browser_embedding(svc: Services, model: str, payload: dict[str, Any]) -> dict[str, Any]:
    image = payload.get("image")
    if not isinstance(image, str):
        raise ApiError(422, "invalid_request", "The request has no 'image' (base64 of the frame).")
    embedded = svc.sam.embed(model, decode_base64(image), Timings())
    # CVAT's decoder reads float32 [1, 256, 64, 64], C order, little-endian.
    features = embedded.embedding["image_embed"].float().cpu().numpy().astype("<f4", copy=False)
    return {"blob": base64.b64encode(np.ascontiguousarray(features).tobytes()).decode()}


# ---- routes --------------------------------------------------------------------------------------
def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


@router.get("/api/functions")
async def list_functions(svc: ServicesDep) -> Response:
    """Nuclio's function list: a JSON object keyed by function id (CVAT iterates its values)."""
    return _json({fid: fn.config(svc) for fid, fn in catalogue(svc).items()})


@router.get("/api/functions/{function_id}", responses={404: {"description": "No such function"}})
async def get_function(function_id: str, svc: ServicesDep) -> Response:
    fn = catalogue(svc).get(function_id)
    if fn is None:
        raise ApiError(
            404, "unknown_function", f"No function {function_id!r}; GET /api/functions lists them."
        )
    return _json(fn.config(svc))


# The body is parsed by hand, by function kind: the schema documents the header and the codes.
_INVOKE_DOC = {
    "parameters": [
        {
            "name": "x-nuclio-function-name",
            "in": "header",
            "required": True,
            "schema": {"type": "string"},
            "description": "The function's id, as GET /api/functions lists it.",
        }
    ],
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object", "additionalProperties": True}}},
    },
}
_INVOKE_ERRORS = {
    400: {"description": "No function name, a body that is not JSON, or an undecodable image"},
    404: {"description": "No such function"},
    413: {"description": "Too large"},
    415: {"description": "Not an image"},
    422: {"description": "A payload the function cannot take"},
    503: {"description": "Model unavailable or loading"},
}


@router.post("/api/function_invocations", responses=_INVOKE_ERRORS, openapi_extra=_INVOKE_DOC)
async def invoke(request: Request, svc: ServicesDep) -> Response:
    function_id = request.headers.get("x-nuclio-function-name")
    if not function_id:
        raise ApiError(400, "missing_function_name", "The x-nuclio-function-name header names no function.")
    fn = catalogue(svc).get(function_id)
    if fn is None:
        raise ApiError(
            404, "unknown_function", f"No function {function_id!r}; GET /api/functions lists them."
        )
    body = await read_limited_body(request, svc.settings.max_request_bytes)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(400, "bad_json", "The invocation body is not JSON.") from None
    if not isinstance(payload, dict):
        raise ApiError(422, "invalid_request", "The invocation body must be a JSON object.")
    response = _json(await run_in_threadpool(fn.invoke, svc, payload))
    # CVAT ignores it; an operator (or a benchmark) sees where a CVAT click's time went, cache tier included.
    context = request_context.current()
    stages = [timings.header() for timings in context.timings if timings.stages] if context else []
    if stages:
        response.headers["Server-Timing"] = ", ".join(stages)
    return response
