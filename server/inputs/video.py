"""Video, through PyAV (its one home): uploaded bytes streamed to RGB frames (the tracking API's propagate)
or one frame of them (POST /v1/video/frame, the web console's video stepping), and video files for jobs:
probing at submit (a clear 4xx for anything that cannot be decoded), streaming decode in frame order (one
decoded frame at a time), resuming after a given frame, and local copies of remote videos. One frame in
memory at a time, however long the video.

Frames are numbered 0, 1, 2... in presentation order, as CVAT numbers the frames of a video task.
PyAV is imported where a video is opened: it loads FFmpeg's libraries, which a server that never reads a
video does not need.
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from server.errors import ApiError
from server.inputs.urls import READERS, read
from server.settings import Settings

VIDEO_EXTENSIONS: tuple[str, ...] = (
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".wmv", ".flv", ".3gp",
)  # fmt: skip
VIDEO_DIR = "videos"  # under data_dir: local copies of remote videos

# scheme → download(url, target file, settings), streaming to disk. Schemes without one are read whole
# through server.sources.READERS (bounded by max_request_bytes) and written out.
Download = Callable[[str, Path, Settings], None]
DOWNLOADERS: dict[str, Download] = {}


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    width: int
    height: int
    fps: float | None
    codec: str


@dataclass(frozen=True)
class Position:
    """The last frame handed out: where decoding resumes (right after it)."""

    frame: int
    pts: int | None  # None: the container gives no timestamps, so resuming decodes from the start


@dataclass(frozen=True)
class DecodedFrame:
    number: int
    pts: int | None
    image: np.ndarray | None  # RGB uint8; None for a frame the caller did not want


class VideoDecodeError(Exception):
    """Decoding stopped at frame `frame` (the first one not decoded)."""

    def __init__(self, frame: int, reason: str) -> None:
        super().__init__(f"decoding failed at frame {frame}: {reason}")
        self.frame = frame
        self.reason = reason


def is_video_path(ref: str) -> bool:
    return PurePosixPath(urlsplit(ref).path if "://" in ref else ref).suffix.lower() in VIDEO_EXTENSIONS


# -- probing ---------------------------------------------------------------------------------------------


def probe(path: Path, shown: str, max_pixels: int) -> VideoInfo:
    """Frame count, size and codec of the first video stream, after decoding its first frame. `shown` is the
    name given in errors (the URL of a downloaded copy). ApiError: 400 missing, unreadable or corrupt; 413
    frames over max_pixels; 415 not a video, or no video stream."""
    import av

    container = _open_for_probe(path, shown)
    try:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["no streams"]
            raise ApiError(
                415, "unsupported_video", f"{shown} has no video stream (it has: {', '.join(kinds)})."
            )
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max_pixels:
            raise ApiError(
                413,
                "video_too_large",
                f"{shown} has {width}x{height} frames, more than {max_pixels} pixels (max_image_pixels).",
            )
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as exc:
            raise ApiError(
                400, "corrupt_video", f"{shown}: its first frame cannot be decoded ({exc})."
            ) from None
        if first is None:
            raise ApiError(400, "corrupt_video", f"{shown} has a video stream without any decodable frame.")
        frames = stream.frames or _count_packets(path, shown)
        fps = float(stream.average_rate) if stream.average_rate else None
        return VideoInfo(frames, first.width, first.height, fps, stream.codec_context.name)
    finally:
        container.close()


def _open_for_probe(path: Path, shown: str) -> Any:
    import av

    if not path.exists():
        raise ApiError(400, "source_not_found", f"The video {shown} does not exist.")
    if not path.is_file():
        raise ApiError(400, "source_not_found", f"The video {shown} is not a file.")
    try:
        return av.open(str(path))
    except PermissionError:
        raise ApiError(400, "source_unreadable", f"The video {shown} cannot be read (permission).") from None
    except (av.FFmpegError, OSError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ApiError(
            415,
            "unsupported_video",
            f"{shown} is not a video FFmpeg can read ({reason}): not a video, or one cut short.",
        ) from None


def _count_packets(path: Path, shown: str) -> int:
    """Frames of a container that does not record their number (mkv, webm): one per packet, no decoding."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        try:
            return sum(1 for packet in container.demux(stream) if packet.size)
        except av.FFmpegError as exc:
            raise ApiError(400, "corrupt_video", f"{shown} cannot be read to its end ({exc}).") from None


# -- decoding --------------------------------------------------------------------------------------------


def decode(
    path: Path, wanted: Callable[[int], bool], after: Position | None = None
) -> Iterator[DecodedFrame]:
    """Every frame after `after` (all from frame 0 when None), in order; only wanted frames are converted to
    RGB. Resuming seeks to the key frame before `after` and decodes forward to it, or, when the container
    gives no timestamps or the seek lands past it, decodes from the start. Raises VideoDecodeError, and
    stops, at the first frame that cannot be decoded."""
    import av

    if after is not None and after.pts is not None:
        container = av.open(str(path))
        decoded = _seek_past(container, after.pts)
        if decoded is not None:
            yield from _frames(container, decoded, wanted, after.frame + 1)
            return
        container.close()
    container = av.open(str(path))
    skip = after.frame + 1 if after is not None else 0
    decoded = container.decode(_stream(container))
    for frame in _frames(container, decoded, lambda n: n >= skip and wanted(n), 0):
        if frame.number >= skip:
            yield frame


def _stream(container: Any) -> Any:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # FFmpeg's own frame threads; decoding holds no GIL
    return stream


def _seek_past(container: Any, pts: int) -> Iterator[Any] | None:
    """The container's frames from just after the one with timestamp `pts`; None when that frame is not
    found that way (then the caller decodes from the start)."""
    import av

    stream = _stream(container)
    try:
        container.seek(pts, stream=stream, backward=True, any_frame=False)
        decoded = container.decode(stream)
        for frame in decoded:
            if frame.pts is None or frame.pts > pts:
                return None
            if frame.pts == pts:
                return decoded
    except av.FFmpegError:
        return None
    return None


def _frames(
    container: Any, decoded: Iterator[Any], wanted: Callable[[int], bool], first: int
) -> Iterator[DecodedFrame]:
    """The rest of `decoded`, numbered from `first`; closes the container."""
    import av

    number = first
    try:
        while True:
            try:
                frame = next(decoded, None)
            except av.FFmpegError as exc:
                raise VideoDecodeError(number, str(exc)) from None
            if frame is None:
                return
            image = frame.to_ndarray(format="rgb24") if wanted(number) else None
            yield DecodedFrame(number, frame.pts, image)
            number += 1
    finally:
        container.close()


# -- uploaded bytes ------------------------------------------------------------------------------------


def iter_frames(data: bytes, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(index, RGB frame) for frames start..stop-1 of the first video stream, in order."""
    import av

    container, stream = _open_upload(data)
    with container:
        index = -1
        try:
            for frame in container.decode(stream):
                index += 1
                if index < start:
                    continue
                if stop is not None and index >= stop:
                    return
                yield index, frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as exc:
            raise ApiError(400, "bad_video", f"The video is corrupt at frame {index + 1}: {exc}.") from None
        if index < start:
            raise ApiError(
                422, "frame_out_of_range", f"The video has {index + 1} frames; start {start} is past its end."
            )


def frame_at(data: bytes, number: int, max_frames: int, max_pixels: int) -> tuple[np.ndarray, int]:
    """Frame `number` (RGB) of an uploaded video, and the video's frame count. Each call decodes from the
    start, so a video of more than `max_frames` frames is refused whole (413): stepping this way is for short
    clips; /propagate and jobs read videos of any length in one pass."""
    import av

    container, stream = _open_upload(data)
    with container:
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max_pixels:
            raise ApiError(
                413,
                "video_too_large",
                f"The video has {width}x{height} frames, more than {max_pixels} pixels "
                "(LABELSERVE_MAX_IMAGE_PIXELS).",
            )
        count = stream.frames or _count_upload_packets(data)
        if count > max_frames:
            raise ApiError(
                413,
                "video_too_long",
                f"The video has {count} frames, more than {max_frames} (LABELSERVE_MAX_VIDEO_FRAMES): "
                "each frame request decodes it from the start. Cut a shorter clip, or track it with "
                "/v1/track/{tracker}/propagate or a job.",
            )
        if number >= count:
            raise ApiError(422, "frame_out_of_range", f"The video has {count} frames (0 to {count - 1}).")
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index == number:
                    return frame.to_ndarray(format="rgb24"), count
        except av.error.FFmpegError as exc:
            raise ApiError(400, "bad_video", f"The video is corrupt before frame {number}: {exc}.") from None
    raise ApiError(422, "frame_out_of_range", f"The video ends before frame {number} ({count} announced).")


def _open_upload(data: bytes) -> tuple[Any, Any]:
    """The container of uploaded bytes and its first video stream; 400 when there is none."""
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError) as exc:
        raise ApiError(
            400, "bad_video", f"The video cannot be opened ({exc}); send an mp4, mkv, webm or avi file."
        ) from None
    if not container.streams.video:
        container.close()
        raise ApiError(400, "no_video_stream", "The file has no video stream (audio only?).")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def _count_upload_packets(data: bytes) -> int:
    """Frames of uploaded bytes whose container does not record their number (webm, mkv): one per packet."""
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        try:
            return sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)
        except av.error.FFmpegError as exc:
            raise ApiError(400, "bad_video", f"The video cannot be read to its end ({exc}).") from None


# -- local copies of remote videos -----------------------------------------------------------------------


def local_path(ref: str) -> Path | None:
    """The file of a local ref (a path or file:// URL); None for a remote one."""
    if "://" not in ref:
        return Path(ref)
    parts = urlsplit(ref)
    return Path(unquote(parts.path)) if parts.scheme.lower() == "file" else None


def copy_path(ref: str, settings: Settings) -> Path:
    """Where the local copy of a remote video lives: one file per URL under data_dir/videos."""
    suffix = PurePosixPath(urlsplit(ref).path).suffix.lower()
    digest = hashlib.sha256(ref.encode()).hexdigest()[:32]
    return settings.data_dir / VIDEO_DIR / f"{digest}{suffix if suffix in VIDEO_EXTENSIONS else ''}"


def fetch(ref: str, settings: Settings, refresh: bool = False) -> Path:
    """The local file of a video: the path itself, or a copy of a remote one, downloaded when missing (or
    always, with `refresh`: a new job reads the object as it is now). ApiError when it cannot be fetched."""
    local = local_path(ref)
    if local is not None:
        return local
    target = copy_path(ref, settings)
    if target.exists() and not refresh:
        return target
    scheme = urlsplit(ref).scheme.lower()
    download = DOWNLOADERS.get(scheme)
    if download is None and scheme not in READERS:
        raise ApiError(
            400,
            "unsupported_url",
            f"Videos cannot be read from {scheme}:// URLs; use a local path or one of {sorted(READERS)}.",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        if download is not None:
            download(ref, partial, settings)
        else:
            partial.write_bytes(read(ref, settings))
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _download_s3(url: str, target: Path, settings: Settings) -> None:
    """Streamed to disk by boto3 (ranged, in parallel): a video may be far larger than an image."""
    from botocore.exceptions import BotoCoreError, ClientError

    from server.inputs.objectstore.clients import api_error
    from server.inputs.objectstore.locations import parse_s3_url, profile_for
    from server.inputs.objectstore.store import store_for

    location = parse_s3_url(url)
    profile, _ = profile_for(location, settings)
    extra = {"VersionId": location.version_id} if location.version_id else None
    try:
        store_for(settings).client(profile, "job").download_file(
            location.bucket, location.key, str(target), ExtraArgs=extra
        )
    except (ClientError, BotoCoreError) as exc:
        raise api_error(exc, str(location), profile, settings, "job") from None


DOWNLOADERS["s3"] = _download_s3
