"""Uploading a finished job's results into a CVAT task, in chunks that survive a crash without duplicates.

Shapes become cvat-sdk annotations through the same conversion the AI-agent DetectionFunction uses
(server.cvat.agent_functions.cvat_annotation), then get the task's label ids, as cvat-sdk's annotate_task
does. Chunks hold whole images, in item order, up to `chunk_size` annotations each; each is one
`PATCH /api/tasks/{id}/annotations?action=create` (the first one a `PUT` with clear_existing).

Exactly once: before a chunk is sent its last item index is committed as `started`, and once CVAT answers
as `confirmed`. A chunk that was started but not confirmed (the process died, or the request failed
without an answer) may or may not have landed, so it is never simply sent again: the task's annotations
are read back and only what is missing is added (a repeated `PUT` replaces, so it is sent whole).

The CVAT ids of what each chunk created (from CVAT's reply to a `PATCH`; read back after a `PUT`, whose
reply has no schema; for a chunk checked after a lost answer, also those already there) are committed with
its confirmation: a corrections report
(server.jobs.corrections) tells from them which pre-labels were kept, edited or deleted.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from models.shapes import Shape
from server.cvat.agent_functions import cvat_annotation
from server.cvat.tasks import Frame, LabelPlan, TaskInfo, cvat_errors, fits, match_frames
from server.errors import ApiError
from server.formats.api_json import render_shape
from server.formats.files import label_of
from server.formats.stored import shape_from_dict
from server.jobs.store import ItemRow, JobStore, UploadedAnnotation, UploadRow

log = logging.getLogger("labelserve.jobs.cvat")

ATTEMPTS = 3  # tries per chunk when CVAT cannot be reached or fails (5xx); each retry checks what landed
RETRY_WAIT_S = 2.0
_TRANSIENT = ("cvat_unreachable", "cvat_error")


@dataclass
class Chunk:
    last: int  # index of its last item
    tags: list[Any] = field(default_factory=list)  # cvat_sdk.models.LabeledImageRequest
    shapes: list[Any] = field(default_factory=list)  # cvat_sdk.models.LabeledShapeRequest
    skipped: int = 0

    @property
    def size(self) -> int:
        return len(self.tags) + len(self.shapes)


def frame_lookup(store: JobStore, job_id: str, task: TaskInfo, same_task: bool) -> Callable[[ItemRow], Frame]:
    """Each done item's frame in the output task: by the frame number in its ref when the job read that
    task, else by name (as checked at submit, checked again now). Raises ApiError when an item has no frame
    or its image size differs from the frame's (its coordinates would land wrong)."""
    if same_task:
        by_index = {frame.index: frame for frame in task.frames}

        def frame_of(item: ItemRow) -> Frame:
            index = int(item.ref.rsplit("/", 1)[1])
            if index not in by_index:
                raise ApiError(400, "unmatched_frames", f"Frame {index} was deleted from {task.describe()}.")
            return by_index[index]
    else:
        by_name = match_frames((item.name for item in store.items(job_id, status="done")), task)

        def frame_of(item: ItemRow) -> Frame:
            return by_name[item.name]

    wrong = []
    for item in store.items(job_id, status="done"):
        frame = frame_of(item)
        if (item.width, item.height) != (frame.width, frame.height):
            wrong.append(
                f"{item.name} is {item.width}×{item.height}, "
                f"frame {frame.index} is {frame.width}×{frame.height}"
            )
    if wrong:
        shown = "; ".join(wrong[:10]) + (f"; and {len(wrong) - 10} more" if len(wrong) > 10 else "")
        raise ApiError(
            400,
            "frame_size_mismatch",
            f"Images differ in size from the frames of {task.describe()}: {shown}.",
        )
    return frame_of


def annotations(shapes: list[Shape], frame: int, plan: LabelPlan, tolerance: float) -> Chunk:
    """One image's shapes as annotations with the task's label ids (a Chunk of one image, `last` unset)."""
    formats = ("polygons",) if plan.conv_mask_to_poly else ("cvat",)
    chunk = Chunk(last=-1)
    for shape in shapes:
        target = plan.targets.get(label_of(shape))
        if target is None:  # a label mapped to nothing (allow_unmatched, or null in label_map)
            chunk.skipped += 1
            continue
        annotation = cvat_annotation(
            render_shape(shape, formats, tolerance), target.id, plan.conv_mask_to_poly
        )
        kind = "tag" if shape.kind == "tag" else annotation.type.value if annotation is not None else None
        # A SAM-refined detection whose mask came out empty stays a box, which a mask label cannot hold.
        if annotation is None or kind is None or not fits(kind, target.type):
            chunk.skipped += 1
            continue
        annotation.frame = frame
        annotation.source = "auto"
        if kind == "skeleton" and not _map_points(annotation, shape, target.points, frame):
            chunk.skipped += 1
            continue
        (chunk.tags if kind == "tag" else chunk.shapes).append(annotation)
    return chunk


def _map_points(skeleton: Any, shape: Shape, points: dict[str, int], frame: int) -> bool:
    """Give a skeleton's elements the CVAT sublabel ids of their keypoints' names; False when the result is
    not one element per sublabel, which CVAT requires."""
    assert shape.keypoints is not None
    kept = []
    for element in skeleton.elements:
        sublabel = points.get(shape.keypoints[element.label_id].name)
        if sublabel is not None:
            element.label_id = sublabel
            element.frame = frame
            element.source = "auto"
            kept.append(element)
    skeleton.elements = kept
    return len({e.label_id for e in kept}) == len(kept) == len(points)


def chunks(
    store: JobStore,
    job_id: str,
    after: int,
    frame_of: Callable[[ItemRow], Frame],
    plan: LabelPlan,
    chunk_size: int,
    tolerance: float,
    first_until: int | None = None,
) -> Iterator[Chunk]:
    """Chunks of the done items after index `after`; the first one ends exactly at `first_until` when given
    (the chunk that was in flight), the others once they hold `chunk_size` annotations."""
    chunk: Chunk | None = None
    for item in store.items(job_id, status="done"):
        if item.index <= after:
            continue
        assert item.result is not None
        shapes = [shape_from_dict(d) for d in json.loads(item.result)]
        one = annotations(shapes, frame_of(item).index, plan, tolerance)
        chunk = chunk or Chunk(last=item.index)
        chunk.last = item.index
        chunk.tags += one.tags
        chunk.shapes += one.shapes
        chunk.skipped += one.skipped
        full = chunk.size >= chunk_size if first_until is None else item.index >= first_until
        if full:
            yield chunk
            chunk, first_until = None, None
    if chunk is not None:
        yield chunk


def upload(
    store: JobStore,
    job_id: str,
    task: TaskInfo,
    plan: LabelPlan,
    frame_of: Callable[[ItemRow], Frame],
    *,
    clear_existing: bool,
    chunk_size: int,
    tolerance: float,
    stopped: Callable[[], bool] = lambda: False,
) -> bool:
    """Upload what is not confirmed yet; False when `stopped` interrupted it (resume continues it)."""
    progress = store.upload(job_id) or UploadRow(-1, None, 0, 0, 0)
    confirmed = progress.confirmed
    pending = progress.started is not None and progress.started > confirmed
    first_until = progress.started if pending else None
    for chunk in chunks(store, job_id, confirmed, frame_of, plan, chunk_size, tolerance, first_until):
        if stopped():
            return False
        # With clear_existing the first chunk is a PUT, which replaces whatever the task had.
        created = _send(
            store, job_id, task, chunk, replace=clear_existing and confirmed < 0, check_first=pending
        )
        store.upload_confirmed(job_id, chunk.last, len(chunk.shapes), len(chunk.tags), chunk.skipped, created)
        confirmed, pending = chunk.last, False
    return True


def _send(
    store: JobStore, job_id: str, task: TaskInfo, chunk: Chunk, *, replace: bool, check_first: bool
) -> list[UploadedAnnotation]:
    """Send the chunk; the CVAT annotations that now stand for it (created, or found already there)."""
    store.upload_started(job_id, chunk.last)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with cvat_errors("uploading annotations", task.url, task_id=task.id):
                if replace:  # PUT replaces every annotation of the task: sending it again is harmless
                    _put(task, chunk.tags, chunk.shapes)
                    # CVAT's schema gives a PUT no reply body: the new ids are read back.
                    return _compare(task, chunk)[2]
                there: list[UploadedAnnotation] = []
                tags, shapes = chunk.tags, chunk.shapes
                if check_first:
                    tags, shapes, there = _compare(task, chunk)
                    log.info(
                        "%s already had %d of the %d annotations of an unconfirmed chunk",
                        task.describe(),
                        len(there),
                        chunk.size,
                    )
                if tags or shapes:
                    there += _recorded(_patch(task, tags, shapes))
                return there
        except ApiError as exc:
            if exc.code not in _TRANSIENT or attempt == ATTEMPTS:
                raise
            log.warning(
                "upload to %s failed (%s); retrying, checking what landed", task.describe(), exc.message
            )
            check_first = True
            time.sleep(RETRY_WAIT_S * attempt)


def _put(task: TaskInfo, tags: list[Any], shapes: list[Any]) -> None:
    from cvat_sdk import models

    task.task.set_annotations(models.LabeledDataRequest(tags=tags, shapes=shapes))


def _patch(task: TaskInfo, tags: list[Any], shapes: list[Any]) -> Any:
    """The created annotations, with their ids (cvat-sdk's update_annotations drops CVAT's reply)."""
    from cvat_sdk import models

    data = models.PatchedLabeledDataRequest(tags=tags, shapes=shapes)
    return task.task.api.partial_update_annotations(
        action="create", id=task.id, patched_labeled_data_request=data
    )[0]


def _recorded(created: Any) -> list[UploadedAnnotation]:
    """CVAT's reply to an upload (its LabeledData) as the annotations to remember."""
    return [_recorded_one("tag", t) for t in created.tags] + [
        _recorded_one("shape", s) for s in created.shapes
    ]


def _compare(task: TaskInfo, chunk: Chunk) -> tuple[list[Any], list[Any], list[UploadedAnnotation]]:
    """The chunk's tags and shapes the task does not have yet, and the task's annotations that stand for the
    others (an identical one already there counts as ours)."""
    existing = task.task.get_annotations()
    have: dict[tuple, list[UploadedAnnotation]] = {}
    for t in existing.tags:
        have.setdefault(_tag_key(t), []).append(_recorded_one("tag", t))
    for s in existing.shapes:
        have.setdefault(_shape_key(s), []).append(_recorded_one("shape", s))
    there: list[UploadedAnnotation] = []

    def fresh(key: tuple) -> bool:
        if have.get(key):
            there.append(have[key].pop(0))
            return False
        return True

    tags = [t for t in chunk.tags if fresh(_tag_key(t))]
    shapes = [s for s in chunk.shapes if fresh(_shape_key(s))]
    return tags, shapes, there


def _recorded_one(kind: Literal["shape", "tag"], annotation: Any) -> UploadedAnnotation:
    return UploadedAnnotation(kind, int(annotation.id), int(annotation.label_id), int(annotation.frame))


def _rounded(values: Any) -> tuple[float, ...]:
    return tuple(round(float(v), 2) for v in values or ())


def _tag_key(tag: Any) -> tuple:
    return ("tag", int(tag.frame), int(tag.label_id))


def _shape_key(shape: Any) -> tuple:
    elements = sorted(
        (int(e.label_id), _rounded(getattr(e, "points", None)), bool(getattr(e, "outside", False)))
        for e in getattr(shape, "elements", None) or ()
    )
    rotation = round(float(getattr(shape, "rotation", 0.0)) % 360.0, 2)
    points = _rounded(getattr(shape, "points", None))
    return (
        "shape",
        int(shape.frame),
        int(shape.label_id),
        shape.type.value,
        points,
        rotation,
        tuple(elements),
    )
