"""/v1/prefetch: compute embeddings in the background, ahead of the annotator. The manager is
server/services/prefetch.py's PrefetchManager (PrefetchDep)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from server.api.body import read_limited_body
from server.api.deps import PrefetchDep, ServicesDep
from server.errors import ApiError
from server.services.prefetch import PrefetchRequest, PrefetchStatus

router = APIRouter(prefix="/v1/prefetch", tags=["prefetch"])

ERRORS = {
    code: {"description": text}
    for code, text in {
        400: "Unusable source, or a range that selects nothing",
        404: "Unknown prefetch run, or unknown model",
        409: "The run already finished",
        413: "Request body too large",
        415: "Not JSON",
        422: "Invalid request, or too many images",
        503: "Too many runs queued (Retry-After), or the model is unavailable or loading",
    }.items()
}


@router.post(
    "",
    status_code=202,
    response_model=PrefetchStatus,
    responses=ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PrefetchRequest"}}},
        }
    },
)
async def submit_prefetch(request: Request, svc: ServicesDep, manager: PrefetchDep) -> PrefetchStatus:
    """Queue a run computing `model`'s embeddings of the images, behind every interactive request."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "Send the prefetch request as application/json.")
    # Read by hand to apply the request size limit: the images may be inline base64.
    body = await read_limited_body(request, svc.settings.max_request_bytes)
    try:
        spec = PrefetchRequest.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None
    # Listing a source directory walks the file system: not on the event loop.
    return await run_in_threadpool(manager.submit, spec)


@router.get("")
def list_prefetch(manager: PrefetchDep) -> list[PrefetchStatus]:
    """Active runs and the last finished ones, newest first: API runs, CVAT webhooks' and look-aheads'."""
    return manager.list()


@router.get("/{run_id}", responses=ERRORS)
def get_prefetch(run_id: str, manager: PrefetchDep) -> PrefetchStatus:
    """Progress: done (cached + encoded) / failed / total, images per second, the first failures."""
    return manager.status(run_id)


@router.delete("/{run_id}", responses=ERRORS)
def cancel_prefetch(run_id: str, manager: PrefetchDep) -> PrefetchStatus:
    """Cancel a queued or running run; images already embedded stay cached."""
    return manager.cancel(run_id)
