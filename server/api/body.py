"""Request bodies that carry an image: JSON (base64 or URL), multipart upload, or raw image bytes."""

from __future__ import annotations

from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from server.errors import ApiError
from server.inputs.urls import read_image_ref
from server.ops.request_context import note_image_bytes
from server.schemas import EmbedRequest
from server.settings import Settings

M = TypeVar("M", bound=BaseModel)

RAW_TYPES = ("image/", "application/octet-stream")


async def read_limited_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # lets request.form() parse what was already read
    return body


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "request_too_large",
        f"The request body is larger than {limit} bytes (LABELSERVE_MAX_REQUEST_BYTES); send a smaller image "
        "or give its URL.",
    )


def _validate(model: type[M], raw: bytes | str, context: dict | None = None) -> M:
    try:
        return model.model_validate_json(raw, context=context)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None


async def parse_embed_request(request: Request, settings: Settings) -> bytes:
    """The image of an /embed call: JSON {"image": {...}}, multipart part 'file', or the raw bytes."""
    content_type = _content_type(request)
    body = await read_limited_body(request, settings.max_request_bytes)
    if content_type == "application/json":
        return await read_image_ref(_validate(EmbedRequest, body).image, settings)
    if content_type == "multipart/form-data":
        data = await _upload(request, settings)
        if data is None:
            raise ApiError(400, "missing_image", "The multipart body has no 'file' part with the image.")
        return data
    if content_type.startswith(RAW_TYPES):
        if not body:
            raise ApiError(400, "empty_image", "The request body is empty; send the image bytes.")
        note_image_bytes(body)
        return body
    raise _unsupported(content_type, "or the raw image with an image/* type")


async def parse_image_with_params(
    request: Request, settings: Settings, model: type[M], part: str
) -> tuple[bytes | None, M]:
    """JSON `model` (its 'image' field inline or by URL), or multipart with part 'file' (the image) and part
    `part` (the same JSON without 'image'). The bytes are None when the body names no image (an image_id)."""
    content_type = _content_type(request)
    body = await read_limited_body(request, settings.max_request_bytes)
    if content_type == "application/json":
        params = _validate(model, body)
    elif content_type == "multipart/form-data":
        data = await _upload(request, settings)
        raw = (await request.form()).get(part)
        if not isinstance(raw, str):
            raise ApiError(400, f"missing_{part}", f"The multipart body has no '{part}' part (JSON).")
        params = _validate(model, raw, context={"upload": data is not None})
        if data is not None:
            return data, params
    else:
        raise _unsupported(content_type, "")
    image = getattr(params, "image", None)
    return (await read_image_ref(image, settings) if image is not None else None), params


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _upload(request: Request, settings: Settings) -> bytes | None:
    form = await request.form(max_part_size=settings.max_request_bytes)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        return None
    data = await upload.read()
    note_image_bytes(data)
    return data


def _unsupported(content_type: str, extra: str) -> ApiError:
    return ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {content_type or '(none)'} is not accepted; send application/json or "
        f"multipart/form-data (part 'file'){' ' + extra if extra else ''}.",
    )
