"""Is a job acceptable? Everything that can be checked at submit is, so a job that is stored can run: its
detector and classes, its output directory, that no running job shares its destination, and, for CVAT
tasks, the connection, the label mapping and that every image has a frame."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from models.detector import DetectorInfo, tiling_problem
from models.multi_tracker import TRACKED_TASKS
from server.cvat import tasks as cvat
from server.errors import ApiError
from server.inputs.objectstore.locations import is_s3_url, parse_s3_url
from server.inputs.objectstore.store import store_for
from server.jobs.spec import JobSpec
from server.jobs.store import ACTIVE_STATES, JobStore
from server.settings import Settings

T = TypeVar("T")


def check_spec(
    spec: JobSpec, info: DetectorInfo, can_refine: bool, check_refine: Callable[[str], object] | None
) -> None:
    """What the detector's `info` says about the spec (classes, task, tiling, format) and its SAM model."""
    unknown = sorted(set(spec.params.classes or ()) - set(info.class_names))
    if unknown:
        raise ApiError(
            422,
            "unknown_class",
            f"Detector {spec.detector!r} has no class ids {unknown}; it has {sorted(info.class_names)}.",
        )
    if spec.source.video is not None and info.task not in TRACKED_TASKS:
        raise ApiError(
            422,
            "unsupported_detector",
            f"{spec.detector!r} is a {info.task} model; video jobs track the boxes or masks of "
            f"{' and '.join(TRACKED_TASKS)} models.",
        )
    if problem := tiling_problem(info, spec.params.detect_params()):
        raise ApiError(422, "unsupported_tiling", problem)
    if info.task == "classify" and spec.output.format not in (None, "cvat_images"):
        raise ApiError(
            422,
            "unsupported_output",
            f"{spec.detector!r} classifies whole images (tags), which {spec.output.format} cannot hold; "
            "use the cvat_images format.",
        )
    sam = spec.sam_refine if spec.review is None else spec.review.sam
    if sam is not None:
        if not can_refine:
            raise ApiError(422, "refine_unavailable", "SAM refinement is not available on this server.")
        if check_refine is not None:
            model_call(sam, check_refine)


def check_output(directory: str, settings: Settings) -> None:
    if is_s3_url(directory):
        store_for(settings).check_writable(directory)
    else:
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as exc:
            raise ApiError(
                400,
                "output_not_writable",
                f"The output directory {directory!r} cannot be written ({exc.strerror or exc}).",
            ) from None


def check_destinations(spec: JobSpec, store: JobStore) -> None:
    """Two running jobs never write the same directory or upload into the same CVAT task."""
    mine = destinations(spec)
    for row in store.jobs(ACTIVE_STATES):
        shared = mine & destinations(JobSpec.model_validate_json(row.spec))
        if shared:
            raise ApiError(
                409,
                "output_in_use",
                f"Job {row.id} is still writing to {sorted(shared)[0]}; pick another.",
            )


def cvat_checked_entries(spec: JobSpec, info: DetectorInfo, settings: Settings) -> list[tuple[str, str]]:
    """The source's entries, after connecting to the CVAT tasks and checking the output task's labels
    and that every image has a frame in it (ApiError otherwise): nothing is stored before that holds."""
    with cvat.Connections(settings) as connections:
        source, output = spec.source.cvat_task, spec.output.cvat_task
        prepared = cvat.prepare(connections, info, spec.sam_refine, spec.params.classes, source, output)
        entries = prepared.entries if prepared.entries is not None else spec.source.enumerate(settings)
        if output is not None and prepared.output is not None and not output.same_task(source):
            cvat.match_frames((name for _, name in entries), prepared.output)
    return entries


def destinations(spec: JobSpec) -> set[str]:
    found = set(spec.output.destinations())
    directory = spec.output.directory
    if directory is not None:  # the same directory however it is spelled
        found.discard(directory)
        if is_s3_url(directory):
            folder = parse_s3_url(directory, folder=True)
            found.add(f"s3://{folder.bucket}/{folder.key}")
        else:
            found.add(repr(str(Path(directory).resolve())))
    return found


def model_call(name: str, lookup: Callable[[str], T]) -> T:
    try:
        return lookup(name)
    except ApiError:
        raise
    except Exception as exc:
        error = _lookup_error(name, exc)
        if error is None:
            raise
        raise error from None


def _lookup_error(name: str, exc: Exception) -> ApiError | None:
    """The registry's errors (models.base) as ApiErrors. Looked up in sys.modules rather than imported:
    models.base pulls in torch, and if it was never imported none of its errors can have been raised."""
    if isinstance(exc, LookupError):
        return ApiError(404, "unknown_model", f"There is no model named {name!r}.")
    base = sys.modules.get("models.base")
    if base is None:
        return None
    if isinstance(exc, base.UnknownModel):
        return ApiError(404, "unknown_model", str(exc))
    if isinstance(exc, base.ModelLoading):
        return ApiError(503, "model_loading", str(exc), headers={"Retry-After": "5"})
    if isinstance(exc, base.ModelUnavailable):
        return ApiError(503, "model_unavailable", f"{exc} Fix: {exc.fix}" if exc.fix else str(exc))
    return None
