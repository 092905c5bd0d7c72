"""Where a completed job's results go: dataset files in a local or s3:// directory (written from the stored
results in item order, so a resumed job's files are byte-identical to an uninterrupted run's), and a CVAT
task (server.jobs.cvat_upload)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from models.detector import DetectorInfo
from server.cvat import tasks as cvat
from server.errors import ApiError
from server.formats.datasets import write_output, write_video_output
from server.formats.files import ImageResult, output_paths
from server.formats.stored import shape_from_dict
from server.formats.tracks import FrameTracks, VideoMeta
from server.inputs.objectstore.locations import is_s3_url, parse_s3_url
from server.inputs.objectstore.store import store_for
from server.inputs.video import fetch, probe
from server.jobs.control import JobControl, JobFailed
from server.jobs.spec import VIDEO_FORMATS, JobSpec
from server.jobs.store import JobStore
from server.settings import Settings

STAGING_DIR = "job-outputs"  # under data_dir: the files of s3:// outputs, until they are uploaded


def output_locations(spec: JobSpec) -> list[str]:
    """The files (or folder, for YOLO labels) a completed job wrote: local paths or s3:// URLs."""
    target, output_format = spec.output.directory, spec.output.format
    if target is None or output_format is None:
        return []
    if is_s3_url(target):
        folder = parse_s3_url(target, folder=True)
        names = [p.as_posix() for p in output_paths(output_format, Path())]  # "gt/gt.txt" keeps its folder
        return [f"s3://{folder.bucket}/{folder.key}{name}" for name in names]
    return [str(p) for p in output_paths(output_format, Path(target))]


def write_files(
    store: JobStore,
    job_id: str,
    spec: JobSpec,
    info: DetectorInfo,
    total: Callable[[], int],
    settings: Settings,
) -> None:
    """Write the output files; an s3:// output is written to a staging folder, then uploaded. Both are
    redone whole when a job fails here and is resumed. `total()`: the job's item count (video formats)."""
    target, output_format = spec.output.directory, spec.output.format
    assert target is not None and output_format is not None
    with output_directory(target, job_id, settings, "output") as directory:
        if output_format in VIDEO_FORMATS:
            meta = _video_meta(spec, total, settings)
            write_video_output(output_format, directory, info, lambda: _tracks(store, job_id), meta)
        else:
            write_output(
                output_format,
                directory,
                info,
                lambda: _results(store, job_id),
                settings.polygon_tolerance,
            )


@contextmanager
def output_directory(target: str, job_id: str, settings: Settings, what: str) -> Iterator[Path]:
    """The folder a job writes its `what` into: `target` itself, or for an s3:// target a staging folder
    (emptied first: no files left from an earlier attempt) uploaded to it when the block ends, and removed
    either way. A write or upload error fails the job (JobFailed), to be redone whole on resume."""
    remote = is_s3_url(target)
    directory = settings.data_dir / STAGING_DIR / job_id if remote else Path(target)
    try:
        if remote:
            shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
        yield directory
        if remote:
            store_for(settings).upload_tree(directory, target)
    except OSError as exc:
        raise JobFailed(f"writing the {what} failed: {exc}") from None
    except ApiError as exc:
        raise JobFailed(f"uploading the {what} failed: {exc.message}") from None
    finally:
        if remote:
            shutil.rmtree(directory, ignore_errors=True)


def upload_to_cvat(
    store: JobStore,
    job_id: str,
    spec: JobSpec,
    info: DetectorInfo,
    connections: cvat.Connections,
    control: JobControl,
    settings: Settings,
) -> bool:
    """Upload the results into the output task (the labels are checked again: the task may have changed
    since submit); False when stopped midway."""
    from server.jobs import cvat_upload  # imports cvat-sdk

    output = spec.output.cvat_task
    assert output is not None
    try:
        task = connections.task(output)
        plan = cvat.plan_labels(info, spec.sam_refine, spec.params.classes, output, task)
        same_task = output.same_task(spec.source.cvat_task)
        frame_of = cvat_upload.frame_lookup(store, job_id, task, same_task)
        return cvat_upload.upload(
            store,
            job_id,
            task,
            plan,
            frame_of,
            clear_existing=output.clear_existing,
            chunk_size=settings.cvat_upload_chunk,
            tolerance=settings.polygon_tolerance,
            stopped=control.stop.is_set,
        )
    except ApiError as exc:
        raise JobFailed(
            f"uploading into the CVAT task failed: {exc.message} The results are kept; resume the job "
            "to retry."
        ) from None


def _video_meta(spec: JobSpec, count: Callable[[], int], settings: Settings) -> VideoMeta:
    assert spec.source.video is not None
    frames = spec.source.frames
    start, step = (frames.start, frames.step) if frames is not None else (0, 1)
    total = count()
    try:
        fps = probe(fetch(spec.source.video, settings), "", settings.max_image_pixels).fps
    except ApiError:
        fps = None
    name = PurePosixPath(urlsplit(spec.source.video).path).name or "video"
    return VideoMeta(name, total, start, start + (total - 1) * step, step, fps)


def _tracks(store: JobStore, job_id: str) -> Iterator[FrameTracks]:
    for item in store.items(job_id, status="done"):
        assert item.width is not None and item.height is not None and item.result is not None
        objects = [(d.pop("track"), shape_from_dict(d)) for d in json.loads(item.result)]
        yield FrameTracks(item.index, int(item.ref), item.width, item.height, objects)


def _results(store: JobStore, job_id: str) -> Iterator[ImageResult]:
    for item in store.items(job_id, status="done"):
        assert item.width is not None and item.height is not None and item.result is not None
        shapes = [shape_from_dict(d) for d in json.loads(item.result)]
        yield ImageResult(item.index, item.name, item.width, item.height, shapes)
