"""What the interactive routes (SAM, detection, tracking) share: their documented error codes, the request
body they parse by hand as OpenAPI sees it, and the JSON reply with its timing and cache headers."""

from __future__ import annotations

import orjson
from fastapi import Response

from server.ops.timing import Timings
from server.schemas import EmbedRequest

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
