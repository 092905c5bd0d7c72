"""Frames of a short video, for clients that cannot decode it themselves (the web console steps a video
through /v1/track with them)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from server.api.body import parse_image_with_params
from server.api.deps import ServicesDep
from server.api.replies import ERRORS, body_doc
from server.inputs.images import encode_png
from server.inputs.urls import read_image_ref
from server.inputs.video import frame_at
from server.schemas import VideoFrameRequest

router = APIRouter(prefix="/v1", tags=["video"])

FRAMES_HEADER = "X-Labelserve-Video-Frames"


@router.post(
    "/video/frame",
    responses={**ERRORS, 200: {"content": {"image/png": {}}, "description": f"The frame; {FRAMES_HEADER}."}},
    response_class=Response,
    openapi_extra=body_doc(
        VideoFrameRequest, {"file": {"type": "string", "format": "binary"}, "params": {"type": "string"}}
    ),
)
async def video_frame(request: Request, svc: ServicesDep) -> Response:
    """Frame `frame` of a video as a lossless PNG (the decoded pixels, as /propagate sees them), with the
    video's frame count in the X-Labelserve-Video-Frames header. Each request decodes from the video's start,
    so videos are limited to LABELSERVE_MAX_VIDEO_FRAMES frames."""
    data, params = await parse_image_with_params(request, svc.settings, VideoFrameRequest, "params")
    if data is None:  # given by reference or inline in JSON, as 'video'
        assert params.video is not None
        data = await read_image_ref(params.video, svc.settings)
    settings = svc.settings

    def run() -> tuple[bytes, int]:
        image, count = frame_at(data, params.frame, settings.max_video_frames, settings.max_image_pixels)
        return encode_png(image), count

    png, count = await run_in_threadpool(run)
    return Response(png, media_type="image/png", headers={FRAMES_HEADER: str(count)})
