"""/v1/storage: browse the buckets of the storage profiles (docs/storage.md), within their allow-list and
prefixes, one bounded page at a time, and read one object's bytes to show it. The web console's bucket browser
uses these; any client with the interactive or jobs scope may."""

from __future__ import annotations

import mimetypes
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from server.api.deps import ServicesDep
from server.inputs.objectstore.store import store_for

router = APIRouter(prefix="/v1/storage", tags=["storage"])

MAX_PAGE = 1000  # S3's own most keys per listing page
ERRORS = {
    code: {"description": text}
    for code, text in {
        400: "Not an s3:// URL",
        403: "A bucket on no profile's allow-list, a key outside its prefix, or no profiles at all",
        404: "No such key or bucket",
        413: "An object larger than LABELSERVE_MAX_REQUEST_BYTES",
        502: "The store failed",
        503: "The store throttled or could not be reached",
    }.items()
}


@router.get("")
def storage_roots(svc: ServicesDep) -> dict:
    """Where browsing may start: each storage profile's buckets, under its prefix. Never the endpoint's
    credentials."""
    return {
        "roots": [
            {"profile": name, "url": f"s3://{bucket}/{profile.prefix}"}
            for name, profile in sorted(svc.settings.storage_profiles.items())
            for bucket in profile.buckets
        ]
    }


@router.get("/list", responses=ERRORS)
async def storage_list(
    svc: ServicesDep,
    url: Annotated[str, Query(description="s3://bucket/prefix, taken literally as a key prefix")],
    cursor: Annotated[str | None, Query(description="`next` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 200,
) -> dict:
    """One page of the folders (`s3://…/` URLs ending in "/") and objects (`url`, `name` below the prefix,
    `size`, `modified`) directly under the prefix, at most `limit` of them together; `next` is the cursor of
    the following page, null after the last."""
    return await run_in_threadpool(store_for(svc.settings).browse, url, cursor, limit)


@router.get("/object", responses=ERRORS, response_class=Response)
async def storage_object(
    svc: ServicesDep, url: Annotated[str, Query(description="s3://bucket/key[?versionId=ID]")]
) -> Response:
    """The object's bytes (through the same cache as a click on that URL), to show an image before clicking.
    Up to `LABELSERVE_MAX_REQUEST_BYTES`."""
    data = await run_in_threadpool(store_for(svc.settings).read, url, "interactive")
    media_type = mimetypes.guess_type(url.partition("?")[0])[0] or "application/octet-stream"
    return Response(data, media_type=media_type, headers={"X-Content-Type-Options": "nosniff"})
