"""SAM endpoints: embed an image once, then segment it by clicks as often as needed."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from server.backpressure import LatestWins
from server.body import parse_embed_request, parse_image_with_params
from server.schemas import EmbedRequest, EmbedResponse, SegmentRequest, SegmentResponse
from server.state import services
from server.timing import Timings

router = APIRouter(prefix="/v1/sam", tags=["sam"])

CLIENT_HEADER = "x-client-id"  # one annotator's session (a browser tab); enables "latest wins" for clicks

ERRORS = {
    code: {"description": text}
    for code, text in {
        400: "Bad image or body",
        404: "Unknown model, or image_id not cached",
        413: "Too large",
        415: "Unsupported media type",
        422: "Invalid parameters or prompts",
        409: "Superseded: a newer click on the same image from the same X-Client-ID arrived first",
        503: "Model unavailable or loading, or the server is at capacity (Retry-After)",
        504: "Waited longer than LABELSERVE_REQUEST_TIMEOUT_S for the model",
    }.items()
}


def body_doc(model: type, multipart: dict) -> dict:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}},
                "multipart/form-data": {"schema": {"type": "object", "properties": multipart}},
                **(
                    {"image/*": {"schema": {"type": "string", "format": "binary"}}}
                    if model is EmbedRequest
                    else {}
                ),
            },
        }
    }


def reply(body: dict, timings: Timings, weights: str | None) -> Response:
    body["timings_ms"] = timings.as_dict()
    headers = {"Server-Timing": timings.header()}
    if "cached" in body:
        headers["X-Labelserve-Cache"] = "hit" if body["cached"] else "miss"
    if weights:
        headers["X-Labelserve-Weights"] = weights
    # orjson: a mask's RLE can hold 10^5 integers, and the stdlib encoder is several times slower on it.
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json", headers=headers
    )


@router.post(
    "/{model}/embed",
    response_model=EmbedResponse,
    responses=ERRORS,
    openapi_extra=body_doc(EmbedRequest, {"file": {"type": "string", "format": "binary"}}),
)
async def embed(model: str, request: Request) -> Response:
    """Compute (or find in the cache) the image embedding; returns the `image_id` to segment by."""
    svc = services(request)
    svc.registry.segmenter(model)  # fail fast on an unknown or unavailable model, before reading the image
    timings = Timings()
    with timings.stage("read"):
        data = await parse_embed_request(request, svc.settings)
    embedded = await run_in_threadpool(svc.sam.embed, model, data, timings)
    height, width = embedded.embedding.original_size
    body = {
        "image_id": embedded.image_id,
        "model": model,
        "width": width,
        "height": height,
        "cached": embedded.cached,
        "cache_tier": embedded.tier,
    }
    return reply(body, timings, svc.registry.record(model).weights)


@router.post(
    "/{model}/segment",
    response_model=SegmentResponse,
    responses=ERRORS,
    openapi_extra=body_doc(
        SegmentRequest,
        {
            "file": {"type": "string", "format": "binary"},
            "prompts": {"type": "string", "description": "SegmentRequest as JSON, without 'image'"},
        },
    ),
)
async def segment(model: str, request: Request) -> Response:
    """Masks for clicks / a box / a previous mask on an image (sent inline or by `image_id`)."""
    svc = services(request)
    svc.registry.segmenter(model)
    timings = Timings()
    with timings.stage("read"):
        data, params = await parse_image_with_params(request, svc.settings, SegmentRequest, "prompts")
    client = request.headers.get(CLIENT_HEADER)
    if client and params.image_id is not None:
        # Latest wins: a click that is still waiting for a worker when a newer one arrives is dropped.
        latest: LatestWins = request.app.state.latest_wins
        key, number = latest.ticket(client[:128], model, params.image_id)

        def run() -> dict:
            latest.check(key, number)
            return svc.sam.segment(model, data, params, timings)

        body = await run_in_threadpool(run)
    else:
        body = await run_in_threadpool(svc.sam.segment, model, data, params, timings)
    return reply(body, timings, svc.registry.record(model).weights)
