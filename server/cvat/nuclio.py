"""labelserve posing as the Nuclio dashboard, so CVAT Community's AI tools call it with no Nuclio install.

CVAT is pointed here with CVAT_NUCLIO_HOST/PORT and CVAT_NUCLIO_INVOKE_METHOD=dashboard; it lists functions
with GET /api/functions and invokes them with POST /api/function_invocations, naming the function in the
x-nuclio-function-name header (../shared/docs/cvat-protocols.md §A.1–A.6).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from models.detector import DetectParams
from server.body import read_limited_body
from server.cvat import render
from server.errors import ApiError
from server.schemas import SegmentRequest
from server.sources import decode_base64
from server.state import Services, services
from server.timing import Timings

router = APIRouter(tags=["cvat"])

BROWSER_SAM_ID = "pth-facebookresearch-sam-vit-h"  # the id CVAT's in-browser SAM decoder is wired to
Handler = Callable[[Services, dict[str, Any]], Any]


@dataclass(frozen=True)
class NuclioFunction:
    id: str
    kind: Literal["interactor", "detector", "tracker"]
    name: str
    description: str
    annotations: dict[str, str]
    handler: Handler

    def config(self, port: int) -> dict[str, Any]:
        """Exactly the keys CVAT's LambdaFunction reads; every annotation value is a string."""
        return {
            "metadata": {
                "name": self.id,
                "annotations": {"name": self.name, "type": self.kind, **self.annotations},
            },
            "spec": {"description": self.description},
            "status": {"state": "ready", "httpPort": port},
        }


def function_id(model: str) -> str:
    return "labelserve-" + model.replace("_", "-")


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
    """One function per loaded model, plus CVAT's browser-SAM id when its model is loaded."""
    functions: dict[str, NuclioFunction] = {}
    for record in svc.registry.describe():
        if record["state"] != "loaded":
            continue
        model = record["name"]
        if record["kind"] == "detector":
            fn = detector_function(svc, model)
            functions[fn.id] = fn
            continue
        fn = NuclioFunction(
            id=function_id(model),
            kind="interactor",
            name=f"labelserve {model}",
            description=f"Interactive segmentation with {model} ({record['weights']}), embeddings cached",
            annotations=_INTERACTOR,
            handler=lambda svc, payload, model=model: _interact(svc, model, payload),
        )
        functions[fn.id] = fn
    browser_model = svc.settings.cvat_browser_sam_model
    if browser_model in {r["name"] for r in svc.registry.describe() if r["state"] == "loaded"}:
        functions[BROWSER_SAM_ID] = NuclioFunction(
            id=BROWSER_SAM_ID,
            kind="interactor",
            name="Segment Anything",
            description=f"Embeddings for CVAT's browser SAM decoder, from labelserve ({browser_model})",
            annotations=_INTERACTOR,
            handler=lambda svc, payload: _browser_embedding(svc, browser_model, payload),
        )
    return functions


def detector_function(svc: Services, model: str) -> NuclioFunction:
    info = svc.registry.detector(model).info
    return NuclioFunction(
        id=function_id(model),
        kind="detector",
        name=f"labelserve {model}",
        description=f"Ultralytics {info.task} model {model} served by labelserve",
        annotations={"spec": json.dumps(render.label_spec(info), separators=(",", ":"))},
        handler=lambda svc, payload: _detect(svc, model, payload),
    )


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
    params = DetectParams(conf=request.threshold) if request.threshold else DetectParams()
    found = svc.detect.detect(model, decode_base64(request.image), params, None, Timings())
    return [render.detector_item(shape, svc.settings.polygon_tolerance) for shape in found.shapes]


def _browser_embedding(svc: Services, model: str, payload: dict[str, Any]) -> dict[str, Any]:
    image = payload.get("image")
    if not isinstance(image, str):
        raise ApiError(422, "invalid_request", "The request has no 'image' (base64 of the frame).")
    embedded = svc.sam.embed(model, decode_base64(image), Timings())
    # CVAT's decoder reads float32 [1, 256, 64, 64], C order, little-endian.
    features = embedded.embedding.features.float().cpu().numpy().astype("<f4", copy=False)
    return {"blob": base64.b64encode(np.ascontiguousarray(features).tobytes()).decode()}


# ---- routes --------------------------------------------------------------------------------------
def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


@router.get("/api/functions")
async def list_functions(request: Request) -> Response:
    """Nuclio's function list: a JSON object keyed by function id (CVAT iterates its values)."""
    svc = services(request)
    return _json({fid: fn.config(svc.settings.port) for fid, fn in catalogue(svc).items()})


@router.get("/api/functions/{function_id}")
async def get_function(function_id: str, request: Request) -> Response:
    svc = services(request)
    fn = catalogue(svc).get(function_id)
    if fn is None:
        raise ApiError(
            404, "unknown_function", f"No function {function_id!r}; GET /api/functions lists them."
        )
    return _json(fn.config(svc.settings.port))


@router.post("/api/function_invocations")
async def invoke(request: Request) -> Response:
    svc = services(request)
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
    return _json(await run_in_threadpool(fn.handler, svc, payload))
