"""A CVAT task's current annotations as a review reads them: its shapes (rectangles, polygons, masks) per
frame, each keeping its CVAT shape id, the frames named as the task's frames are named in a job's items.
And as a corrections report reads them: every tag, shape and track with its id, label and `source`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from models.shapes import Shape
from server.cvat.spec import CvatTaskSource
from server.cvat.tasks import Connections, cvat_errors, frame_name
from server.errors import ApiError
from server.formats.annotations import AnnotatedImage, Annotation
from server.formats.rle import cvat_rle_decode

REVIEWED_TYPES = ("rectangle", "polygon", "mask")  # others (points, skeletons, ...) are not reviewed


def task_annotations(connections: Connections, source: CvatTaskSource) -> list[AnnotatedImage]:
    """Every frame of the task with its shapes, in frame order. ApiError 400 for a shape on a frame the task
    does not have or with a label it does not have."""
    task = connections.task(source)
    labels = {int(label.id): str(label.name) for label in task.labels}
    with cvat_errors(f"reading the annotations of task {task.id}", task.url, task_id=task.id):
        found = task.task.get_annotations()
    frames = {frame.index: frame for frame in task.frames}
    by_frame: dict[int, list[Annotation]] = {index: [] for index in frames}
    for shape in found.shapes:
        kind = str(shape.type)
        if kind not in REVIEWED_TYPES:
            continue
        frame = frames.get(int(shape.frame))
        if frame is None:
            raise ApiError(
                400, "bad_annotations", f"Shape {shape.id} of {task.describe()} is on frame {shape.frame}, "
                "which the task does not have (deleted?).",
            )  # fmt: skip
        label = labels.get(int(shape.label_id))
        if label is None:
            raise ApiError(
                400, "bad_annotations",
                f"Shape {shape.id} of {task.describe()} has label id {shape.label_id}, not its label.",
            )  # fmt: skip
        geometry = _shape(kind, label, [float(v) for v in shape.points], float(shape.rotation or 0), frame)
        by_frame[frame.index].append(Annotation(str(shape.id), geometry))
    return [
        AnnotatedImage(frame_name(frame.name), frame.width, frame.height, by_frame[frame.index])
        for frame in task.frames
    ]


def _shape(kind: str, label: str, points: list[float], rotation: float, frame: Any) -> Shape:
    if kind == "rectangle":
        x1, y1, x2, y2 = points[:4]
        box = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
        if rotation % 360:
            return Shape("rotated_box", label=label, box=box, rotation=rotation)
        return Shape("box", label=label, box=box)
    if kind == "polygon":
        return Shape("polygon", label=label, polygon=points)
    return Shape("mask", label=label, mask=cvat_rle_decode(points, frame.width, frame.height))


@dataclass(frozen=True)
class TaskObject:
    """One annotation of a task as it stands: CVAT's `source` is auto (uploaded by a model), semi-auto (a
    model's annotation a human edited, or one drawn with an AI tool), manual, file (imported) or consensus."""

    kind: Literal["tag", "shape", "track"]
    id: int
    label_id: int
    frame: int
    source: str


def task_objects(connections: Connections, source: CvatTaskSource) -> list[TaskObject]:
    """Every tag, shape and track of the task (skeleton points are part of their skeleton)."""
    task = connections.task(source)
    with cvat_errors(f"reading the annotations of task {task.id}", task.url, task_id=task.id):
        found = task.task.get_annotations()
    kinds: tuple[tuple[Literal["tag", "shape", "track"], Any], ...] = (
        ("tag", found.tags),
        ("shape", found.shapes),
        ("track", found.tracks),
    )
    return [
        TaskObject(kind, int(a.id), int(a.label_id), int(a.frame), str(a.source or "manual"))
        for kind, annotations in kinds
        for a in annotations
    ]
