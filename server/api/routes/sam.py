"""SAM endpoints: embed an image once, then segment it by clicks as often as needed."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from server.api.body import parse_embed_request, parse_image_with_params
from server.api.deps import LatestWinsDep, ServicesDep
from server.api.replies import ERRORS, body_doc, reply
from server.ops.timing import Timings
from server.schemas import EmbedRequest, EmbedResponse, SegmentRequest, SegmentResponse

router = APIRouter(prefix="/v1/sam", tags=["sam"])

CLIENT_HEADER = "x-client-id"  # one annotator's session (a browser tab); enables "latest wins" for clicks


@router.post(
    "/{model}/embed",
    response_model=EmbedResponse,
    responses=ERRORS,
    openapi_extra=body_doc(EmbedRequest, {"file": {"type": "string", "format": "binary"}}),
)
async def embed(model: str, request: Request, svc: ServicesDep) -> Response:
    """Compute (or find in the cache) the image embedding; returns the `image_id` to segment by."""
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
async def segment(model: str, request: Request, svc: ServicesDep, latest: LatestWinsDep) -> Response:
    """Masks for clicks / a box / a previous mask on an image (sent inline or by `image_id`)."""
    svc.registry.segmenter(model)
    timings = Timings()
    with timings.stage("read"):
        data, params = await parse_image_with_params(request, svc.settings, SegmentRequest, "prompts")
    client = request.headers.get(CLIENT_HEADER)
    if client and params.image_id is not None:
        # Latest wins: a click that is still waiting for a worker when a newer one arrives is dropped.
        key, number = latest.ticket(client[:128], model, params.image_id)

        def run() -> dict:
            latest.check(key, number)
            return svc.sam.segment(model, data, params, timings)

        body = await run_in_threadpool(run)
    else:
        body = await run_in_threadpool(svc.sam.segment, model, data, params, timings)
    return reply(body, timings, svc.registry.record(model).weights)
