"""Tracking: start objects on a frame, then step them frame by frame, or propagate them through a video."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from models.shapes import Shape
from models.tracker import Frame
from server.api.body import parse_image_with_params
from server.api.deps import Services, ServicesDep
from server.api.replies import ERRORS, body_doc
from server.errors import ApiError
from server.formats.cvat_json import shape_to_trackable, trackable_to_shape
from server.inputs.images import image_id
from server.inputs.urls import read_image_ref
from server.inputs.video import iter_frames
from server.schemas import PropagateRequest, TrackShape, TrackStartRequest, TrackStepRequest

router = APIRouter(prefix="/v1", tags=["track"])

_FILE = {"file": {"type": "string", "format": "binary"}}


def api_scope(tracker: str) -> str:
    return f"api:{tracker}"


def parse_shapes(shapes: list[TrackShape], width: int, height: int) -> list[Shape]:
    parsed = []
    for index, item in enumerate(shapes):
        try:
            parsed.append(trackable_to_shape(item.model_dump(), width, height))
        except ValueError as exc:
            raise ApiError(422, "bad_track_shape", f"shape {index}: {exc}.") from None
    return parsed


def render_results(svc: Services, results: list[tuple[Shape | None, str]]) -> list[dict | None]:
    """Each result as the CVAT type its object was started as; None for a lost object."""
    tolerance = svc.settings.polygon_tolerance
    return [
        shape_to_trackable(shape, as_type, tolerance) if shape is not None else None
        for shape, as_type in results
    ]


@router.get("/trackers")
async def trackers(svc: ServicesDep) -> dict:
    """The trackers this server runs, and the shape types each follows."""
    return {
        "trackers": [
            {"name": name, "accepts": list(svc.track.tracker(name).accepts)} for name in svc.track.names()
        ],
        "states": svc.track.stats(),
    }


@router.post(
    "/track/{tracker}",
    responses=ERRORS,
    openapi_extra=body_doc(TrackStartRequest, {**_FILE, "params": {"type": "string"}}),
)
async def start(tracker: str, request: Request, svc: ServicesDep) -> Response:
    """Start following each shape on this frame. Returns one state id per shape, for `/step`."""
    svc.track.tracker(tracker)
    data, params = await parse_image_with_params(request, svc.settings, TrackStartRequest, "params")
    assert data is not None

    def run() -> dict:
        frame = svc.track.frame(data)
        height, width = frame.size
        states = svc.track.init(
            tracker, frame, parse_shapes(params.shapes, width, height), api_scope(tracker)
        )
        return {"tracker": tracker, "width": width, "height": height, "states": states}

    return Response(orjson.dumps(await run_in_threadpool(run)), media_type="application/json")


@router.post(
    "/track/{tracker}/step",
    responses=ERRORS,
    openapi_extra=body_doc(TrackStepRequest, {**_FILE, "params": {"type": "string"}}),
)
async def step(tracker: str, request: Request, svc: ServicesDep) -> Response:
    """Find the objects on the next frame: a shape per state, of the type it was started with; null once an
    object is lost (occluded or gone; later frames may find it again)."""
    svc.track.tracker(tracker)
    data, params = await parse_image_with_params(request, svc.settings, TrackStepRequest, "params")
    assert data is not None

    def run() -> dict:
        frame = svc.track.frame(data)
        found = svc.track.step(frame, params.states, api_scope(tracker))
        return {"shapes": render_results(svc, found), "states": params.states}

    return Response(orjson.dumps(await run_in_threadpool(run)), media_type="application/json")


@router.delete(
    "/track/{tracker}/states/{state}", responses={404: {"description": "No such state for this tracker"}}
)
async def forget(tracker: str, state: str, svc: ServicesDep) -> dict:
    """Drop a state now instead of letting it expire."""
    if not svc.track.forget(state, api_scope(tracker)):
        raise ApiError(404, "unknown_track_state", f"No tracking state {state[:32]!r} for {tracker!r}.")
    return {"deleted": state}


@router.post(
    "/track/{tracker}/propagate",
    responses=ERRORS,
    openapi_extra=body_doc(PropagateRequest, {**_FILE, "params": {"type": "string"}}),
)
async def propagate(tracker: str, request: Request, svc: ServicesDep) -> StreamingResponse:
    """Follow the shapes from frame `start` to `stop` of a video. The reply is NDJSON, one line per frame as
    soon as it is tracked: {"frame": i, "shapes": [shape | null, ...]}; the first line is frame `start`."""
    svc.track.tracker(tracker)
    data, params = await parse_image_with_params(request, svc.settings, PropagateRequest, "params")
    if data is None:  # given by reference or inline in JSON, as 'video'
        assert params.video is not None
        data = await read_image_ref(params.video, svc.settings)
    frames = iter_frames(data, params.start, params.stop)
    # The first frame is decoded and the shapes checked before the reply starts, so bad input is a 4xx.
    first = await run_in_threadpool(next, frames, None)
    if first is None:
        raise ApiError(422, "frame_out_of_range", f"The video has no frame {params.start}.")
    index, image = first
    height, width = image.shape[:2]
    scope = f"propagate:{id(request)}"
    start_frame = Frame(image, f"{image_id(data)}#{index}")
    states = await run_in_threadpool(
        svc.track.init, tracker, start_frame, parse_shapes(params.shapes, width, height), scope
    )

    def lines() -> Iterator[bytes]:
        try:
            yield orjson.dumps({"frame": index, "shapes": [s.model_dump() for s in params.shapes]}) + b"\n"
            video_id = start_frame.content_id.partition("#")[0]
            for number, picture in frames:
                found = svc.track.step(Frame(picture, f"{video_id}#{number}"), states, scope)
                body = {"frame": number, "shapes": render_results(svc, found)}
                yield orjson.dumps(body) + b"\n"
        except ApiError as exc:  # the status line is gone: the error becomes the last line
            yield orjson.dumps({"error": {"code": exc.code, "message": exc.message}}) + b"\n"
        finally:
            for state in states:
                svc.track.forget(state, scope)

    return StreamingResponse(iterate_in_threadpool(lines()), media_type="application/x-ndjson")
