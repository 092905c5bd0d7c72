"""/v1/jobs: submit, watch, list and cancel pre-labeling jobs. The engine (server/jobs/engine.py) is JobsDep.
/v1/corrections: how people corrected a pre-labelled CVAT task (server/jobs/corrections.py).

The handlers are plain functions, so FastAPI runs them on its thread pool: submitting enumerates the source
(a directory walk) and the store is SQLite, neither of which belongs on the event loop.
"""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse

from server.api.deps import JobsDep
from server.formats.corrections import corrections_csv
from server.jobs.corrections import CorrectionsRequest, ReportFormat, report_rows
from server.jobs.spec import JobSpec
from server.jobs.status import JobStatus
from server.jobs.store import JobState
from server.ops.request_context import note_image_reference, redact_url
from server.services.collections import Source

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
corrections_router = APIRouter(prefix="/v1/corrections", tags=["jobs"])

ERRORS = {
    code: {"description": text}
    for code, text in {
        400: "Unusable source or output directory; CVAT unreachable, credentials refused, unknown task, "
        "images without a frame in the CVAT task",
        403: "An s3:// source or output that the storage profiles do not allow, or whose key may not write",
        404: "Unknown job, or unknown detector",
        409: "The job already finished, or its output directory or CVAT task is in use",
        422: "Invalid job spec; the detector's labels do not map onto the CVAT task's (label_mapping)",
        502: "CVAT failed or answered unexpectedly",
        503: "Detector unavailable or loading",
    }.items()
}


@router.post("", status_code=201, responses=ERRORS)
def submit_job(spec: JobSpec, jobs: JobsDep) -> JobStatus:
    """Validate the job (source, detector, output directory), store it and queue it."""
    note_image_reference(source_reference(spec.source))
    return jobs.submit(spec)


def source_reference(source: Source) -> str:
    """The job's images for the audit log: where they are, with no credentials or URL queries."""
    if source.cvat_task is not None:
        where = (
            redact_url(source.cvat_task.url)
            if source.cvat_task.url
            else f"profile {source.cvat_task.profile}"
        )
        return f"cvat task {source.cvat_task.task_id} at {where}"
    if source.directory is not None or source.manifest is not None:
        return redact_url(source.directory or source.manifest or "")
    listed = source.paths or source.urls or []
    more = f" and {len(listed) - 1} more" if len(listed) > 1 else ""
    return (redact_url(listed[0]) if listed else "") + more


@router.get("", responses=ERRORS)
def list_jobs(
    jobs: JobsDep, state: JobState | None = None, limit: int = Query(default=100, ge=1, le=1000)
) -> dict:
    """Jobs, newest first."""
    return {"jobs": jobs.list(state=state, limit=limit)}


@router.get("/{job_id}", responses=ERRORS)
def get_job(job_id: str, jobs: JobsDep) -> JobStatus:
    """State, progress (done/failed/total, images per second, ETA), outputs, and the first failures."""
    return jobs.status(job_id)


@router.post("/{job_id}/resume", responses=ERRORS)
def resume_job(job_id: str, jobs: JobsDep) -> JobStatus:
    """Run a failed or cancelled job again from where it stopped (e.g. after an upload into CVAT failed);
    finished images are not redone."""
    return jobs.resume(job_id)


@router.delete("/{job_id}", responses=ERRORS)
def cancel_job(job_id: str, jobs: JobsDep) -> JobStatus:
    """Cancel a queued or running job; the finished items keep their results."""
    return jobs.cancel(job_id)


CORRECTION_ERRORS = {
    code: {"description": text}
    for code, text in {
        400: "CVAT unreachable, credentials refused or unknown task; a task without pre-labels; a job that "
        "did not upload into this task",
        404: "Unknown prelabel_job",
        409: "The job has not completed, or uploaded before labelserve recorded what it uploaded",
        422: "Invalid request",
        502: "CVAT failed or answered unexpectedly",
    }.items()
}


@corrections_router.post(
    "",
    responses=CORRECTION_ERRORS | {200: {"content": {"text/csv": {}}, "description": "The report"}},
)
def corrections(request: CorrectionsRequest, jobs: JobsDep, format: ReportFormat = "json") -> object:
    """Per class of a pre-labelled CVAT task: pre-labels accepted (still source auto), edited (semi-auto),
    deleted (gone; counted only when `prelabel_job` names the job that uploaded them), objects missed
    (added by a human), and the acceptance rate. `format=csv` answers CSV."""
    report = jobs.corrections(request)
    if format == "csv":
        return PlainTextResponse(corrections_csv(*report_rows(report)), media_type="text/csv")
    return report
