"""Video files → RGB frames, streamed with PyAV: one frame in memory at a time, however long the video."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np

from server.errors import ApiError


def iter_frames(data: bytes, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(index, RGB frame) for frames start..stop-1 of the first video stream, in order."""
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError) as exc:
        raise ApiError(
            400, "bad_video", f"The video cannot be opened ({exc}); send an mp4, mkv, webm or avi file."
        ) from None
    with container:
        if not container.streams.video:
            raise ApiError(400, "no_video_stream", "The file has no video stream (audio only?).")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
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
