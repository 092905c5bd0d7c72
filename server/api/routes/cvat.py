"""/v1/cvat: CVAT tells labelserve what an annotator will open next. Webhooks (a job starts) and look-ahead
(frames after the one being clicked) both warm embeddings through server/services/warmup.py (WarmupDep).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from server.api.body import read_limited_body
from server.api.deps import WarmupDep
from server.errors import ApiError
from server.services.prefetch import PrefetchStatus
from server.services.warmup import SIGNATURE_HEADER, LookaheadRequest

router = APIRouter(prefix="/v1/cvat", tags=["cvat"])

WEBHOOK_MAX_BYTES = 4 * 1024**2  # CVAT's payloads carry one task or job: kilobytes

ERRORS = {
    code: {"description": text}
    for code, text in {
        400: "The delivery is not JSON",
        401: "Missing or wrong X-Signature-256: nothing was run",
        403: "The profile has no webhook_secret",
        404: "Unknown CVAT profile or model",
        413: "Body too large",
        415: "Not JSON",
        422: "Invalid look-ahead request",
        503: "Too many prefetch runs (Retry-After; CVAT retries the delivery), or the model is unavailable",
    }.items()
}


@router.post("/webhooks/{profile}", responses=ERRORS)
async def cvat_webhook(profile: str, request: Request, warmup: WarmupDep) -> dict:
    """A CVAT project or organization webhook (register it with `labelserve cvat webhook register`). Needs no
    API key: the body's HMAC-SHA256 with the profile's webhook_secret, in X-Signature-256, authenticates it.
    `update:job` prefetches the job's frames in frame order when it gets an assignee or goes "in progress",
    and cancels that when the job is completed or unassigned. Answers what it did."""
    body = await read_limited_body(request, WEBHOOK_MAX_BYTES)
    signature = request.headers.get(SIGNATURE_HEADER)
    return await run_in_threadpool(warmup.webhook, profile, body, signature)


@router.post(
    "/lookahead",
    status_code=202,
    responses=ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/LookaheadRequest"}}},
        }
    },
)
async def cvat_lookahead(request: Request, warmup: WarmupDep) -> list[PrefetchStatus]:
    """Prefetch the `count` frames after `frame` of a CVAT task (what the AI-agent function asks after each
    new frame). A newer frame replaces the older frame's run; the same frame joins its run."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "Send the look-ahead request as application/json.")
    try:
        spec = LookaheadRequest.model_validate_json(await read_limited_body(request, WEBHOOK_MAX_BYTES))
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None
    return await run_in_threadpool(warmup.lookahead, spec)
