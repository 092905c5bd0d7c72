"""Review jobs: the detector runs over the annotated images exactly as in a pre-labeling job (same items,
batches, progress, cancel and resume), with low-confidence boxes kept. When every image is done, the stored
detections and the annotations are scored (server.services.review) and the ranked findings are written.

The annotations (a local path, an s3:// object or folder, or the source CVAT task's shapes) are read once,
at submit, to check names and labels, and stored with the job: it scores them as they were then, however the
file or task changes while it runs or before it is resumed. (A job stored before the snapshot existed reads
them again.)
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path, PurePosixPath

import numpy as np

from models.detector import DetectorInfo
from server.cvat.tasks import Connections
from server.errors import ApiError
from server.formats.annotations import (
    AnnotatedImage,
    AnnotationError,
    AnnotationFormat,
    dump_dataset,
    load_dataset,
    read_annotations,
)
from server.formats.files import yolo_label_path
from server.formats.findings import FINDINGS_FILE, write_findings
from server.formats.review_html import REPORT_FILE, write_report
from server.formats.stored import shape_from_dict
from server.inputs.images import decode_image
from server.inputs.objectstore.locations import is_s3_url
from server.inputs.objectstore.store import store_for
from server.jobs.control import JobFailed
from server.jobs.image_job import REVIEW_OF
from server.jobs.outputs import output_directory
from server.jobs.spec import JobSpec, ReviewSpec
from server.jobs.store import JobStore
from server.services.collections import ImageEntry
from server.services.review import ImageInput, rank_findings, score_boxes, score_edges
from server.settings import Settings

REVIEWED_TASKS = ("detect", "segment")  # detectors whose boxes ObjectLab can compare


def review_entries(spec: JobSpec, info: DetectorInfo, settings: Settings) -> tuple[list[ImageEntry], bytes]:
    """The job's items: the annotated images, in the dataset's order (YOLO: the source's order), after
    checking that the detector gives boxes, that every annotated image is in the source and that the
    detector's classes map onto the dataset's labels; and the annotations to store with the job
    (dump_dataset). ApiError (4xx) otherwise."""
    review = spec.review
    assert review is not None
    if info.task not in REVIEWED_TASKS:
        raise ApiError(
            422,
            "unsupported_detector",
            f"{spec.detector!r} is a {info.task} model; a review compares boxes, so it needs a "
            f"{' or '.join(REVIEWED_TASKS)} model.",
        )
    with Connections(settings) as connections:
        dataset = load(spec, connections, settings)
        class_map(review, info, dataset)
        snapshot = dump_dataset(dataset)
        if review.cvat_issues is not None:  # the connection and the job, before anything is stored
            from server.cvat.issues import check_job

            check_job(connections, review.cvat_issues)
        if spec.source.cvat_task is not None:
            entries = connections.source_frames(spec.source.cvat_task)
            selected = spec.source.frames.select(entries) if spec.source.frames is not None else entries
            return selected, snapshot
    entries = spec.source.enumerate(settings)
    if review.format == "yolo":
        by_label = {annotation_name(review, name): (ref, name) for ref, name in entries}
        stray = [image.name for image in dataset if image.name not in by_label]
        _no_images(stray, spec)
        return entries, snapshot
    by_name = dict((name, (ref, name)) for ref, name in entries)
    _no_images([image.name for image in dataset if image.name not in by_name], spec)
    return [by_name[image.name] for image in dataset], snapshot


def annotation_name(review: ReviewSpec, image_name: str) -> str:
    """The name an image's annotations are filed under: its YOLO label file, or the image's own name."""
    return yolo_label_path(image_name) if review.format == "yolo" else image_name


def _no_images(names: list[str], spec: JobSpec) -> None:
    if names:
        shown = ", ".join(repr(n) for n in names[:5]) + (
            f" and {len(names) - 5} more" if len(names) > 5 else ""
        )
        raise ApiError(
            400,
            "images_missing",
            f"The annotations name {len(names)} images the source does not have: {shown}. Point the source "
            "at the folder the annotations' image names are relative to.",
        )


def dataset_of(
    store: JobStore, job_id: str, spec: JobSpec, connections: Connections, settings: Settings
) -> list[AnnotatedImage]:
    """The job's annotations as stored at submit (read again for a job stored without them)."""
    stored = store.annotations(job_id)
    return load_dataset(stored) if stored is not None else load(spec, connections, settings)


def load(spec: JobSpec, connections: Connections, settings: Settings) -> list[AnnotatedImage]:
    """The annotations (ApiError 400 when they cannot be read)."""
    review = spec.review
    assert review is not None
    if review.format == "cvat_task":
        from server.cvat.annotations import task_annotations  # imports cvat-sdk

        assert spec.source.cvat_task is not None
        return task_annotations(connections, spec.source.cvat_task)
    assert review.annotations is not None
    if is_s3_url(review.annotations):
        with tempfile.TemporaryDirectory(prefix="labelserve-annotations-") as folder:
            return _read(review.format, _download(review.annotations, review.format, Path(folder), settings))
    if "://" in review.annotations:
        raise ApiError(
            400, "unsupported_annotations", "review.annotations must be a local path or s3:// URL."
        )
    path = Path(review.annotations)
    try:
        found = path.exists()
    except (OSError, ValueError):  # e.g. a NUL byte in the path
        found = False
    if not found:
        raise ApiError(400, "annotations_not_found", f"The annotations {review.annotations!r} do not exist.")
    return _read(review.format, path)


def _read(fmt: AnnotationFormat, path: Path) -> list[AnnotatedImage]:
    try:
        return read_annotations(fmt, path)
    except AnnotationError as exc:
        raise ApiError(400, "bad_annotations", f"The {fmt} annotations cannot be read: {exc}") from None


YOLO_FILES = (".yaml", ".yml", ".txt")  # what a YOLO annotations folder holds besides images


def _download(url: str, fmt: AnnotationFormat, folder: Path, settings: Settings) -> Path:
    """An s3:// annotations file, or YOLO folder (its data.yaml and label files), copied into `folder`;
    the local path to read. ApiError 400 when there is nothing there."""
    store = store_for(settings)
    if fmt != "yolo":
        target = folder / (PurePosixPath(url).name or "annotations")
        try:
            target.write_bytes(store.read(url, "job"))
        except ApiError as exc:
            if exc.status == 404:
                raise ApiError(
                    400, "annotations_not_found", f"The annotations {url!r}: {exc.message}"
                ) from None
            raise
        return target
    base = url.rstrip("/") + "/"
    keys = list(store.list_keys(base, YOLO_FILES))
    if not keys:
        raise ApiError(400, "annotations_not_found", f"No YOLO data.yaml or label files under {url!r}.")
    for key in keys:
        target = folder.joinpath(*(part for part in key.split("/") if part not in ("", ".", "..")))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.read(base + key, "job"))
    return folder


def class_map(
    review: ReviewSpec, info: DetectorInfo, dataset: list[AnnotatedImage]
) -> tuple[list[str], dict[str, str]]:
    """The dataset's labels (ObjectLab's classes, in first-seen order) and detector class -> label.
    ApiError 422 when the mapping names unknown classes or labels, or when no detector class maps."""
    labels = list(dict.fromkeys(a.shape.label or "" for image in dataset for a in image.annotations))
    names = set(info.class_names.values())
    given = review.label_mapping
    if given is not None:
        unknown = sorted(set(given) - names)
        if unknown:
            raise ApiError(
                422, "bad_label_mapping",
                f"label_mapping names detector classes {unknown} that {info.name!r} does not have; it has "
                f"{sorted(names)}.",
            )  # fmt: skip
        strange = sorted(set(given.values()) - set(labels))
        if strange:
            raise ApiError(
                422, "bad_label_mapping",
                f"label_mapping maps onto labels {strange} the annotations never use; they use {labels}.",
            )  # fmt: skip
    mapping = given if given is not None else {n: n for n in names if n in labels}
    if labels and not mapping:
        raise ApiError(
            422,
            "labels_unmapped",
            f"None of {info.name!r}'s classes is a label of the annotations ({labels[:10]}); give "
            "review.label_mapping {detector class: dataset label}.",
        )
    return labels, mapping


def annotated_items(
    store: JobStore, job_id: str, spec: JobSpec, connections: Connections, settings: Settings
) -> dict[int, AnnotatedImage]:
    """Item index -> its annotations, for the items still pending (what SAM prompts come from)."""
    review = spec.review
    assert review is not None
    by_name = {image.name: image for image in dataset_of(store, job_id, spec, connections, settings)}
    found = {}
    for item in store.items(job_id, status="pending"):
        key = annotation_name(review, item.name)
        if key in by_name:
            found[item.index] = by_name[key]
    return found


def write_review(
    store: JobStore,
    job_id: str,
    spec: JobSpec,
    info: DetectorInfo,
    settings: Settings,
    read: Callable[[str], bytes],
    connections: Connections,
) -> None:
    """Score the stored detections against the annotations and write findings.json and report.html (staged
    and uploaded for an s3:// output, as pre-labeling outputs are); `read` gives the report's images."""
    review, target = spec.review, spec.output.directory
    assert review is not None and target is not None
    try:
        dataset = dataset_of(store, job_id, spec, connections, settings)
        classes, mapping = class_map(review, info, dataset)
    except ApiError as exc:
        raise JobFailed(f"reading the annotations failed: {exc.message}") from None
    by_name = {image.name: image for image in dataset}
    images, predictions, failed, refs = [], 0, 0, {}
    for item in store.items(job_id):
        refs[item.index] = item.ref
        if item.status != "done":
            failed += 1
            continue
        assert item.width is not None and item.height is not None and item.result is not None
        annotated = by_name.get(annotation_name(review, item.name))
        annotations = annotated.in_pixels(item.width, item.height) if annotated is not None else []
        found, sam_masks = [], {}
        for data in json.loads(item.result):
            shape = shape_from_dict(data)
            answers = shape.attributes.get(REVIEW_OF)
            if answers is not None and shape.mask is not None:
                sam_masks[answers] = shape.mask
                continue
            label = mapping.get(shape.label or "")
            if label is not None and shape.bounds() is not None:
                found.append(replace(shape, label=label))
        predictions += len(found)
        images.append(ImageInput(item.index, item.name, annotations, found, sam_masks))
    findings = rank_findings(
        score_boxes(images, classes, review.max_score) + score_edges(images, review.max_score)
    )
    listed = findings[: review.top_k] if review.top_k is not None else findings
    summary: dict[str, object] = {
        "detector": spec.detector,
        "conf": spec.params.conf,
        "images": len(images),
        "images_failed": failed,
        "annotations": sum(len(i.annotations) for i in images),
        "predictions": predictions,
        "findings": len(findings),
        "listed": len(listed),
        "by_kind": dict(Counter(f.kind for f in findings)),
    }
    target_job = spec.issues()
    if target_job is not None:
        from server.cvat.issues import write_issues  # imports cvat-sdk

        try:
            written = write_issues(connections, target_job, findings, spec.detector)
        except ApiError as exc:
            raise JobFailed(f"writing CVAT issues failed: {exc.message} Resume the job to retry.") from None
        summary["cvat_issues"] = {"job_id": target_job.job_id, **asdict(written)}

    def image_of(frame: int) -> np.ndarray | None:
        try:
            return decode_image(read(refs[frame]), settings.max_image_pixels)
        except (ApiError, OSError, ValueError):
            return None

    title = f"labelserve review: {len(listed)} findings, {len(images)} images, detector {spec.detector}"
    with output_directory(target, job_id, settings, "findings") as directory:
        write_findings(directory / FINDINGS_FILE, listed, summary)
        write_report(directory / REPORT_FILE, listed, image_of, review.thumbnails, title)
