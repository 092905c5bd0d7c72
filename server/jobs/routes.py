"""/v1/jobs: submit, watch, list and cancel pre-labeling jobs. The engine is `app.state.jobs`.

The handlers are plain functions, so FastAPI runs them on its thread pool: submitting enumerates the source
(a directory walk) and the store is SQLite, neither of which belongs on the event loop.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from server.jobs.engine import Engine, JobStatus
from server.jobs.spec import JobSpec
from server.jobs.store import JobState

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

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


def engine(request: Request) -> Engine:
    return request.app.state.jobs


@router.post("", status_code=201, responses=ERRORS)
def submit_job(spec: JobSpec, request: Request) -> JobStatus:
    """Validate the job (source, detector, output directory), store it and queue it."""
    return engine(request).submit(spec)


@router.get("", responses=ERRORS)
def list_jobs(
    request: Request, state: JobState | None = None, limit: int = Query(default=100, ge=1, le=1000)
) -> dict:
    """Jobs, newest first."""
    return {"jobs": engine(request).list(state=state, limit=limit)}


@router.get("/{job_id}", responses=ERRORS)
def get_job(job_id: str, request: Request) -> JobStatus:
    """State, progress (done/failed/total, images per second, ETA), outputs, and the first failures."""
    return engine(request).status(job_id)


@router.post("/{job_id}/resume", responses=ERRORS)
def resume_job(job_id: str, request: Request) -> JobStatus:
    """Run a failed or cancelled job again from where it stopped (e.g. after an upload into CVAT failed);
    finished images are not redone."""
    return engine(request).resume(job_id)


@router.delete("/{job_id}", responses=ERRORS)
def cancel_job(job_id: str, request: Request) -> JobStatus:
    """Cancel a queued or running job; the finished items keep their results."""
    return engine(request).cancel(job_id)
