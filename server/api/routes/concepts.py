"""/v1/concepts/{model}: every instance of one or more noun phrases in an image (SAM 3)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from server.api.body import parse_image_with_params
from server.api.deps import ServicesDep
from server.api.replies import ERRORS, body_doc, reply
from server.ops.timing import Timings
from server.schemas import ConceptRequest, ConceptResponse

router = APIRouter(prefix="/v1/concepts", tags=["concepts"])


@router.post(
    "/{model}",
    response_model=ConceptResponse,
    responses=ERRORS,
    openapi_extra=body_doc(
        ConceptRequest,
        {
            "file": {"type": "string", "format": "binary"},
            "prompts": {"type": "string", "description": "ConceptRequest as JSON, without 'image'"},
        },
    ),
)
async def find_concepts(model: str, request: Request, svc: ServicesDep) -> Response:
    """Every instance of each phrase (and exemplar boxes) on an image sent inline or by `image_id`: box,
    score, the phrase that found it, and its mask in the asked encodings."""
    svc.registry.concept(model)  # fail fast on an unknown or unavailable model, or one with no concept head
    timings = Timings()
    with timings.stage("read"):
        data, params = await parse_image_with_params(request, svc.settings, ConceptRequest, "prompts")
    body = await run_in_threadpool(svc.concepts.find, model, data, params, timings)
    return reply(body, timings, svc.registry.record(model).weights)
