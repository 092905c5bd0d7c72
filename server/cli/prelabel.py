"""`labelserve prelabel SOURCE... --model NAME --out DIR --format F`: a job run in this process, no server.

A single video file (mp4, mkv, mov, webm, avi, ...) is pre-labelled with detection and multi-object tracking
(`--tracker`, ByteTrack by default) into `--format cvat_video` (CVAT for video 1.1 tracks) or `mot`.

`--review ANNOTATIONS` reviews instead: the dataset's labels (COCO, CVAT XML or YOLO) are scored against the
model's opinion, and OUT gets findings.json and report.html (docs/review.md).

`--sample BUDGET --sample-embeddings SAM_MODEL` ranks which images of SOURCE to annotate next: OUT gets
ranking.json and ranking.csv (docs/sampling.md); `--new-task NAME` also makes a CVAT task of the picks.

`--cvat-task URL/tasks/ID` uploads the results into that CVAT task (as well as, or instead of, writing
files); with no SOURCE the task's own frames are pre-labelled. Credentials come from the environment, as
for cvat-cli: CVAT_ACCESS_TOKEN (a personal access token), or CVAT_USER and CVAT_PASSWORD.

Running the same command again with the same state database resumes the unfinished job with the same spec
(finished images are not redone) instead of starting over. Exit codes: 0 every image succeeded, 1 some image
or the job failed, 2 bad arguments (including an unusable source or output, an unknown model, a CVAT task
that cannot be reached or whose labels do not match the model's).

The main CLI passes a `runtime(model, sam_refine)` that loads the models and returns the detector lookup and
the SAM refinement callable (None when no --sam-refine was asked for).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from models.base import ModelError
from server.errors import ApiError
from server.inputs.objectstore.locations import is_s3_url
from server.inputs.video import is_video_path
from server.jobs.engine import GetDetector, LocalEngine
from server.jobs.image_job import Embed, Refine
from server.jobs.spec import JobSpec
from server.jobs.status import JobStatus
from server.jobs.store import ACTIVE_STATES
from server.scale.batch import RayBatchEngine, ray_available
from server.services.collections import IMAGE_EXTENSIONS
from server.settings import get_settings

Runtime = Callable[[str, str | None], tuple[GetDetector, Refine | None]]
# (detector, SAM model) -> the detector lookup and the image embedder of a sample job
SampleRuntime = Callable[[str, str | None], tuple[GetDetector, Embed | None]]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
STATE_DB_NAME = ".labelserve-jobs.sqlite3"  # default state database, inside the output directory
CVAT_STATE_DB_NAME = "prelabel-jobs.sqlite3"  # ... under LABELSERVE_DATA_DIR when only uploading to CVAT


def add_prelabel_command(
    subparsers: Any, runtime: Runtime, sample_runtime: SampleRuntime | None = None
) -> None:
    """`subparsers` is what `ArgumentParser.add_subparsers()` returned; sets `func(args) -> int`."""
    p = subparsers.add_parser(
        "prelabel",
        help="pre-label a directory, image files or URLs with a detector (resumable)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "source",
        nargs="*",
        metavar="SOURCE",
        help="one directory or s3://bucket/prefix, or one CVAT manifest.jsonl, or one video file or URL, or "
        "image files, or image URLs (none: the frames of --cvat-task)",
    )
    p.add_argument("--model", required=True, help="detector model name")
    p.add_argument(
        "--out", help="output directory (created if missing), or s3://bucket/prefix; needs --format"
    )
    p.add_argument(
        "--format",
        choices=("cvat_images", "coco", "yolo", "cvat_video", "mot", "findings"),
        help="findings: a review (--review), the default then",
    )
    video = p.add_argument_group("video", "a single video SOURCE: detection + multi-object tracking")
    video.add_argument(
        "--tracker", choices=("bytetrack", "botsort"), help="multi-object tracker (default bytetrack)"
    )
    video.add_argument("--track-buffer", type=int, help="frames a lost track is kept (default 30)")
    video.add_argument("--start-frame", type=int, help="first frame (default 0)")
    video.add_argument("--stop-frame", type=int, help="last frame, included (default: the last)")
    video.add_argument("--frame-step", type=int, help="every N-th frame (default 1)")
    cvat = p.add_argument_group(
        "CVAT task", "credentials: CVAT_ACCESS_TOKEN, or CVAT_USER and CVAT_PASSWORD (environment)"
    )
    cvat.add_argument(
        "--cvat-task",
        metavar="URL",
        help="upload into this task: its page (https://cvat.example.com/tasks/42) or SERVER#ID",
    )
    cvat.add_argument("--cvat-org", metavar="SLUG", help="the organization the task belongs to")
    cvat.add_argument(
        "--label-map",
        action="append",
        default=[],
        metavar="MODEL=CVAT",
        help="upload model label MODEL as CVAT label CVAT (repeatable; MODEL= drops MODEL)",
    )
    cvat.add_argument("--allow-unmatched", action="store_true", help="drop labels the task does not have")
    cvat.add_argument("--clear-existing", action="store_true", help="replace the task's annotations")
    cvat.add_argument("--conv-mask-to-poly", action="store_true", help="upload masks as polygons")
    p.add_argument("--conf", type=float, help="minimum confidence (default 0.25; 0.1 for videos)")
    p.add_argument("--iou", type=float, help="NMS IoU threshold (default 0.7)")
    p.add_argument("--classes", help="comma-separated class ids to keep (default: all)")
    p.add_argument("--imgsz", type=int, help="inference size (default 640)")
    p.add_argument("--max-det", type=int, help="most detections per image (default 300)")
    p.add_argument("--sam-refine", metavar="SAM_MODEL", help="refine each detection into a mask with SAM")
    p.add_argument("--batch-size", type=int, default=8, help="images per detector call (default 8)")
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local (default): threads in this process; ray: an actor pool on Ray Data, joining "
        "LABELSERVE_RAY_ADDRESS or starting a local Ray instance (needs the `ray` extra; docs/scale-out.md)",
    )
    p.add_argument(
        "--readers", type=int, help="reader/decoder threads ahead of inference (default: 4 with CUDA, else 0)"
    )
    p.add_argument(
        "--state-db",
        type=Path,
        help=f"job state database (default OUT/{STATE_DB_NAME}; LABELSERVE_DATA_DIR/{STATE_DB_NAME} for s3, "
        f"LABELSERVE_DATA_DIR/{CVAT_STATE_DB_NAME} without --out)",
    )
    review = p.add_argument_group(
        "review", "flag likely label errors in a dataset of SOURCE's images instead (docs/review.md); the "
        "model must not have been trained on these labels",
    )  # fmt: skip
    review.add_argument(
        "--review", metavar="ANNOTATIONS", help="COCO JSON, CVAT XML file or YOLO directory (local or s3://)"
    )
    review.add_argument("--review-format", choices=("coco", "cvat_images", "yolo"), default="coco")
    review.add_argument(
        "--review-map",
        action="append",
        default=[],
        metavar="CLASS=LABEL",
        help="detector class -> dataset label",
    )
    review.add_argument("--review-sam", metavar="SAM_MODEL", help="check polygon and mask edges with SAM")
    review.add_argument("--top-k", type=int, help="list at most this many findings")
    sample = p.add_argument_group(
        "sample", "rank which images of SOURCE to annotate next instead (docs/sampling.md)"
    )  # fmt: skip
    sample.add_argument("--sample", type=int, metavar="BUDGET", help="how many images to pick")
    sample.add_argument(
        "--sample-embeddings",
        metavar="SAM_MODEL",
        help="the SAM model giving image vectors, or 'detector' for the detector's own pooled features",
    )
    sample.add_argument("--uncertainty", choices=("least_confidence", "margin", "entropy"), default="entropy")
    sample.add_argument(
        "--prefilter", type=float, default=3.0, help="k-center among PREFILTER x BUDGET (0: all)"
    )
    sample.add_argument("--seed", type=int, default=0, help="the first pick (default 0)")
    sample.add_argument(
        "--new-task",
        metavar="NAME",
        help="also make a CVAT task NAME of the picks, in rank order, from the CVAT cloud storage the images "
        "are in (no bytes copied; credentials as for --cvat-task)",
    )
    sample.add_argument(
        "--new-task-server", metavar="URL", help="the CVAT of the new task (default: --cvat-task's)"
    )
    sample.add_argument(
        "--new-task-labels",
        metavar="NAME[:TYPE],...",
        help="the new task's labels (TYPE: rectangle, polygon, mask, ...; default any)",
    )
    sample.add_argument("--new-task-project", type=int, metavar="ID", help="or: make it in this project")
    sample.add_argument(
        "--new-task-cloud-storage",
        type=int,
        metavar="ID",
        help="the CVAT cloud storage of the pool's bucket (default for a --cvat-task pool: the task's)",
    )
    sample.add_argument(
        "--new-task-manifest", metavar="KEY", help="its manifest (default: the first attached)"
    )
    sample.add_argument("--new-task-segment-size", type=int, metavar="N", help="images per CVAT job")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prelabel, runtime=runtime, sample_runtime=sample_runtime)


def build_spec(args: argparse.Namespace) -> JobSpec:
    """The job spec the arguments describe; paths are made absolute so a re-run from elsewhere matches.
    Raises ValueError (or pydantic's ValidationError) on bad arguments."""
    sources: list[str] = args.source
    if args.review is not None and args.format is None:
        args.format = "findings"
    if args.sample is not None and args.format is None:
        args.format = "ranking"
    if (args.out is None) != (args.format is None):
        raise ValueError("--out and --format go together")
    if args.out is None and args.cvat_task is None:
        raise ValueError("give --out and --format, or --cvat-task, or both")
    if not sources and args.cvat_task is None:
        raise ValueError("give a SOURCE, or --cvat-task to pre-label the task's own frames")
    cvat_task = cvat_task_fields(args) if args.cvat_task is not None else None
    urls = ["://" in s and not s.startswith("file://") for s in sources]
    if any(urls) and not all(urls):
        raise ValueError("give either image URLs or local paths, not both")
    source: dict[str, Any]
    single = sources[0] if len(sources) == 1 else None
    if not sources:
        assert cvat_task is not None
        source = {"cvat_task": cvat_task}
    elif single is not None and is_video_path(single):
        source = {"video": single if urls[0] else str(Path(single).resolve())}
        frames = {"start": args.start_frame, "stop": args.stop_frame, "step": args.frame_step}
        if any(v is not None for v in frames.values()):
            source["frames"] = {k: v for k, v in frames.items() if v is not None}
    elif single is not None and single.endswith(".jsonl"):
        source = {"manifest": single if urls[0] else str(Path(single).resolve())}
    elif single is not None and is_s3_url(single) and not single.lower().endswith(IMAGE_EXTENSIONS):
        source = {"directory": single}
    elif all(urls):
        source = {"urls": sources}
    elif single is not None and Path(single).is_dir():
        source = {"directory": str(Path(sources[0]).resolve())}
    else:
        missing = [s for s in sources if not Path(s).exists()]
        if missing:
            raise ValueError(f"{missing[0]} does not exist")
        source = {"paths": [str(Path(s).resolve()) for s in sources]}
    params: dict[str, Any] = {
        k: v
        for k, v in {"conf": args.conf, "iou": args.iou, "imgsz": args.imgsz, "max_det": args.max_det}.items()
    }
    if args.classes is not None:
        try:
            params["classes"] = [int(c) for c in args.classes.split(",") if c.strip()]
        except ValueError:
            raise ValueError(f"--classes must be comma-separated class ids, got {args.classes!r}") from None
    output: dict[str, Any] = {}
    if args.out is not None:
        output |= {"format": args.format, "directory": output_directory(args.out)}
    if cvat_task is not None:
        options = {
            "label_map": _label_map(args.label_map),
            "allow_unmatched": args.allow_unmatched,
            "clear_existing": args.clear_existing,
            "conv_mask_to_poly": args.conv_mask_to_poly,
        }
        # With the task as the source, the output names no task: it is the source's.
        output["cvat_task"] = options if "cvat_task" in source else cvat_task | options
    tracker = {"type": args.tracker, "track_buffer": args.track_buffer}
    tracking = {k: v for k, v in tracker.items() if v is not None}
    framing = (args.start_frame, args.stop_frame, args.frame_step)
    if (tracking or any(v is not None for v in framing)) and "video" not in source:
        raise ValueError("--tracker, --track-buffer and the frame range need a video SOURCE")
    return JobSpec.model_validate(
        {
            "source": source,
            "detector": args.model,
            "params": {k: v for k, v in params.items() if v is not None},
            "sam_refine": args.sam_refine,
            "output": output,
            "batch_size": args.batch_size,
            "engine": args.engine,
        }
        | ({"tracker": tracking} if tracking else {})
        | ({"review": _review(args)} if args.review is not None else {})
        | ({"sample": _sample(args)} if args.sample is not None else {})
    )


def _sample(args: argparse.Namespace) -> dict[str, Any]:
    if args.sample_embeddings is None:
        raise ValueError("--sample needs --sample-embeddings SAM_MODEL (or detector)")
    vectors = (
        {"embedding": "detector"}
        if args.sample_embeddings == "detector"
        else {"embedding": "sam", "embeddings": args.sample_embeddings}
    )
    sample = vectors | {"budget": args.sample, "uncertainty": args.uncertainty, "prefilter": args.prefilter,
                        "seed": args.seed}  # fmt: skip
    if args.new_task is not None:
        sample["cvat_task"] = _new_task(args)
    elif any(getattr(args, name) is not None for name in NEW_TASK_OPTIONS):
        raise ValueError("the --new-task-* options describe the task --new-task NAME makes: give it")
    return sample


NEW_TASK_OPTIONS = ("new_task_server", "new_task_labels", "new_task_project", "new_task_cloud_storage",
                    "new_task_manifest", "new_task_segment_size")  # fmt: skip


def _new_task(args: argparse.Namespace) -> dict[str, Any]:
    """--new-task and its options as a sample spec's `cvat_task` (server.cvat.spec.CvatNewTask)."""
    server = args.new_task_server
    if server is None and args.cvat_task is not None:
        server = cvat_task_fields(args)["url"]
    if server is None:
        raise ValueError("--new-task needs --new-task-server URL (or a --cvat-task pool, whose CVAT it uses)")
    labels = None
    if args.new_task_labels is not None:
        labels = []
        for item in args.new_task_labels.split(","):
            name, _, kind = item.strip().partition(":")
            labels.append({"name": name, "type": kind or "any"})
    task: dict[str, Any] = {"url": server, "name": args.new_task, **cvat_login()}
    optional = {
        "organization": args.cvat_org,
        "labels": labels,
        "project_id": args.new_task_project,
        "cloud_storage_id": args.new_task_cloud_storage,
        "manifest": args.new_task_manifest,
        "segment_size": args.new_task_segment_size,
    }
    return task | {k: v for k, v in optional.items() if v is not None}


def _review(args: argparse.Namespace) -> dict[str, Any]:
    mapping = {}
    for pair in args.review_map:
        detector, sep, label = pair.partition("=")
        if not sep or not detector or not label:
            raise ValueError(f"--review-map wants CLASS=LABEL, got {pair!r}")
        mapping[detector] = label
    annotations = args.review if is_s3_url(args.review) else str(Path(args.review).resolve())
    review: dict[str, Any] = {"annotations": annotations, "format": args.review_format}
    optional = {"label_mapping": mapping or None, "sam": args.review_sam, "top_k": args.top_k}
    return review | {k: v for k, v in optional.items() if v is not None}


def output_directory(out: str) -> str:
    return out if is_s3_url(out) else str(Path(out).resolve())


def cvat_task_fields(args: argparse.Namespace) -> dict[str, Any]:
    """--cvat-task and the environment's credentials as a spec's connection fields."""
    found = re.fullmatch(r"(?P<url>.+?)(?:/tasks/(?P<page>\d+)(?:/.*)?|#(?P<id>\d+))", args.cvat_task.strip())
    if found is None:
        raise ValueError(
            "--cvat-task wants a task page (https://cvat.example.com/tasks/42) or SERVER#ID, "
            f"got {args.cvat_task!r}"
        )
    task: dict[str, Any] = {"url": found["url"], "task_id": int(found["page"] or found["id"])}
    if args.cvat_org:
        task["organization"] = args.cvat_org
    return task | cvat_login()


def cvat_login() -> dict[str, str]:
    """The environment's CVAT credentials, as cvat-cli reads them, as a spec's login fields."""
    token, user, password = (os.environ.get(k) for k in ("CVAT_ACCESS_TOKEN", "CVAT_USER", "CVAT_PASSWORD"))
    if token:
        return {"token": token}
    if user and password:
        return {"username": user, "password": password}
    raise ValueError("set CVAT_ACCESS_TOKEN, or CVAT_USER and CVAT_PASSWORD, to log in to CVAT")


def _label_map(pairs: list[str]) -> dict[str, str | None]:
    mapping: dict[str, str | None] = {}
    for pair in pairs:
        model, sep, cvat = pair.partition("=")
        if not sep or not model:
            raise ValueError(f"--label-map wants MODEL=CVAT, got {pair!r}")
        mapping[model] = cvat or None
    return mapping


def cmd_prelabel(args: argparse.Namespace) -> int:
    try:
        spec = build_spec(args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"error: {problems}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    try:
        embed = None
        if spec.sample is not None:
            if args.sample_runtime is None:
                raise ApiError(422, "embed_unavailable", "sampling is not available in this command")
            get_detector, embed = args.sample_runtime(spec.detector, spec.sample.embeddings)
            refine = None
        else:
            sam = spec.review.sam if spec.review is not None else spec.sam_refine
            get_detector, refine = args.runtime(spec.detector, sam)
    except (ApiError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    settings = get_settings()
    if args.out is None:
        state_db = args.state_db or settings.data_dir / CVAT_STATE_DB_NAME
    else:
        local_out = None if is_s3_url(args.out) else Path(args.out)
        state_db = args.state_db or (local_out or settings.data_dir) / STATE_DB_NAME
    try:
        readers = args.readers if args.readers is not None else 4 if torch.cuda.is_available() else 0
        ray = RayBatchEngine(settings) if ray_available() else None
        engine = LocalEngine(
            get_detector, refine, state_db=state_db, settings=settings, readers=readers, embed=embed, ray=ray
        )
    except OSError as exc:
        print(f"error: cannot open the state database {state_db}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        try:
            previous = _unfinished(engine, spec)
            if previous is not None:
                status = engine.resume(previous, credentials=spec)
                print(
                    f"resuming job {previous}: {status.done + status.failed}/{status.total} done",
                    file=sys.stderr,
                )
            else:
                status = engine.submit(spec)
        except ApiError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return EXIT_USAGE if exc.status < 500 else EXIT_FAILED
        final = _follow(engine, status.id, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        engine.close()  # an interrupted job goes back to queued, for the next run to resume
    return _report(final)


def _unfinished(engine: LocalEngine, spec: JobSpec) -> str | None:
    """The newest job with this exact spec that did not complete. An unfinished job with other settings
    but the same output directory or CVAT task is superseded (cancelled): this command is what the user
    wants now. Stored specs have their credentials redacted, so the comparison is between redacted specs."""
    found = None
    redacted = JobSpec.model_validate_json(spec.model_dump_json())
    for row in engine.store.jobs():
        if row.state == "completed":
            continue
        other = JobSpec.model_validate_json(row.spec)
        if other == redacted:
            found = found or row.id
        elif (
            set(other.output.destinations()) & set(spec.output.destinations()) and row.state in ACTIVE_STATES
        ):
            engine.cancel(row.id)
            print(f"superseding unfinished job {row.id}, which had other settings", file=sys.stderr)
    return found


def _follow(engine: LocalEngine, job_id: str, progress: bool) -> JobStatus:
    from tqdm import tqdm

    status = engine.status(job_id)
    bar = tqdm(
        total=status.total,
        initial=status.done + status.failed,
        unit="img",
        disable=not progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    with bar:
        while True:
            status = engine.status(job_id)
            bar.update(status.done + status.failed - bar.n)
            bar.set_postfix(failed=status.failed, refresh=False)
            if status.state not in ACTIVE_STATES:
                return status
            time.sleep(0.2)


def _report(status: JobStatus) -> int:
    for failure in status.failures:
        print(f"failed: {failure.image}: {failure.error}", file=sys.stderr)
    if status.failed > len(status.failures):
        print(f"... and {status.failed - len(status.failures)} more failed images", file=sys.stderr)
    if status.state != "completed":
        print(f"job {status.id} {status.state}: {status.error or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_FAILED
    print(
        f"job {status.id} completed: {status.done} images labelled, {status.failed} failed", file=sys.stderr
    )
    for path in status.outputs:
        print(path)
    return EXIT_OK if status.failed == 0 else EXIT_FAILED
