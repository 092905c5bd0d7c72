"""Detection: one image in, shapes out, in labelserve's own format or rendered for CVAT, COCO or YOLO."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from models.detector import DetectParams
from server.api.body import parse_image_with_params
from server.api.deps import ServicesDep
from server.api.replies import ERRORS, body_doc, reply
from server.formats.api_json import render_shape
from server.formats.cvat_json import detector_item
from server.ops.timing import Timings
from server.schemas import DetectRequest

router = APIRouter(prefix="/v1/detect", tags=["detect"])


@router.post(
    "/{model}",
    responses=ERRORS,
    openapi_extra=body_doc(DetectRequest, {
        "file": {"type": "string", "format": "binary"},
        "params": {"type": "string", "description": "DetectRequest as JSON, without 'image'"},
    }),
)  # fmt: skip
async def detect(model: str, request: Request, svc: ServicesDep) -> Response:
    """Detect objects. Concurrent requests with the same parameters share one forward pass."""
    svc.registry.detector(model)
    timings = Timings()
    with timings.stage("read"):
        data, params = await parse_image_with_params(request, svc.settings, DetectRequest, "params")
    assert data is not None
    detect_params = DetectParams.of(params)
    found = await run_in_threadpool(svc.detect.detect, model, data, detect_params, params.sam_refine, timings)
    tolerance = (
        svc.settings.polygon_tolerance if params.polygon_tolerance is None else params.polygon_tolerance
    )
    with timings.stage("serialize"):
        if params.format == "cvat":
            shapes = [detector_item(shape, tolerance) for shape in found.shapes]
        else:
            shapes = [render_shape(shape, params.mask_formats, tolerance) for shape in found.shapes]
    body = {
        "model": model,
        "task": found.detector.info.task,
        "width": found.width,
        "height": found.height,
        "format": params.format,
        "shapes": shapes,
    }
    return reply(body, timings, svc.registry.record(model).weights)
