"""What a job's status says: its state and progress, its outputs once completed, its first failures, and the
progress of its upload into a CVAT task."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, Field

from server.cvat.spec import CvatTaskOutput
from server.jobs.outputs import output_locations
from server.jobs.spec import JobSpec
from server.jobs.store import JobRow, JobState, JobStore
from server.settings import Settings

FAILURES_SHOWN = 20  # failed items listed in a job's status


class ItemFailure(BaseModel):
    index: int
    image: str
    error: str


class CvatUploadStatus(BaseModel):
    task: str = Field(description="The CVAT task's page.")
    uploaded_images: int = Field(description="Images whose annotations CVAT acknowledged.")
    shapes: int
    tags: int
    skipped: int = Field(
        description="Detections left out: label mapped to nothing, or a kind the CVAT label cannot hold."
    )


class JobStatus(BaseModel):
    id: str
    state: JobState
    spec: JobSpec
    created_at: str = Field(description="ISO 8601, UTC.")
    started_at: str | None = Field(description="When it first started running.")
    finished_at: str | None
    error: str | None = Field(description="Why the job failed (not why single images failed).")
    total: int = Field(description="Images in the source (for a video: frames in its range).")
    done: int = Field(description="Images labelled.")
    failed: int = Field(description="Images that could not be read, decoded or detected; see failures.")
    pending: int
    images_per_second: float | None = Field(description="This run's throughput (since it last started).")
    eta_seconds: float | None = Field(description="Pending images at that throughput; while running.")
    outputs: list[str] = Field(
        description="The files written, and the CVAT task uploaded to (or made), once completed."
    )
    failures: list[ItemFailure] = Field(description=f"The first {FAILURES_SHOWN} failed images, in order.")
    cvat_upload: CvatUploadStatus | None = Field(
        default=None, description="Progress of the upload into a CVAT task, once it has started."
    )


def job_status(row: JobRow, store: JobStore, settings: Settings, rate: float | None) -> JobStatus:
    """`row`'s status; `rate` is its images per second in this process (None when unknown)."""
    spec = JobSpec.model_validate_json(row.spec)
    pending = row.total - row.done - row.failed
    running = row.state == "running"
    eta = round(pending / rate, 1) if running and rate else None
    outputs = output_locations(spec) if row.state == "completed" else []
    upload = store.upload(row.id) if spec.output.cvat_task is not None else None
    if row.state == "completed" and spec.output.cvat_task is not None:
        outputs.append(task_page(spec.output.cvat_task, settings))
    made = store.created_task(row.id) if row.state == "completed" and spec.new_task() is not None else None
    if made is not None:  # a sample job's new CVAT task
        outputs.append(made[1])
    failures = store.failures(row.id, FAILURES_SHOWN) if row.failed else []
    return JobStatus(
        id=row.id,
        state=row.state,
        spec=spec,
        created_at=_iso(row.created),
        started_at=_iso(row.started),
        finished_at=_iso(row.finished),
        error=row.error,
        total=row.total,
        done=row.done,
        failed=row.failed,
        pending=pending,
        images_per_second=round(rate, 2) if rate else None,
        eta_seconds=eta,
        outputs=outputs,
        failures=[ItemFailure(index=f.index, image=f.name, error=f.error or "") for f in failures],
        cvat_upload=CvatUploadStatus(
            task=task_page(spec.output.cvat_task, settings),
            uploaded_images=store.done_through(row.id, upload.confirmed),
            shapes=upload.shapes,
            tags=upload.tags,
            skipped=upload.skipped,
        )
        if upload is not None and spec.output.cvat_task is not None
        else None,
    )


def task_page(task: CvatTaskOutput, settings: Settings) -> str:
    profile = settings.cvat_profiles.get(task.profile) if task.profile else None
    url = task.url or (profile.url if profile is not None else f"profile {task.profile}")
    return f"{url.rstrip('/')}/tasks/{task.task_id}"


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
