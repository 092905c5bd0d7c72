"""The corrections report of a pre-labelled CVAT task: per class, how many of the model's pre-labels people
accepted, edited or deleted, and how many objects they added that the model missed
(server.services.corrections counts).

The task is read now, with the request's own credentials (a finished job keeps none). Naming the
pre-labeling job that uploaded into the task (`prelabel_job`) adds what only it knows: the CVAT ids of what
it created (server.jobs.cvat_upload records them), so a pre-label that is gone counts as deleted. Without
it, deletions are unknown.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.cvat.spec import CvatConnection, CvatTaskSource, server_key
from server.cvat.tasks import Connections
from server.errors import ApiError
from server.jobs.spec import JobSpec
from server.jobs.store import JobStore
from server.services.corrections import COLUMNS, count_corrections, has_prelabels, row_of
from server.settings import Settings

ReportFormat = Literal["json", "csv"]

NOTE_KNOWN = (
    "Per class, by the label each pre-label was uploaded with: accepted = still source auto; edited = "
    "source semi-auto (relabelled: its label changed); deleted = gone from the task; missed = manual or "
    "semi-auto annotations that are not pre-labels (added by a human, also with AI tools; annotations made "
    "before the pre-labels count too); other = auto annotations of other runs, file imports, consensus. "
    "acceptance_rate = accepted / (accepted + edited + deleted)."
)
NOTE_UNKNOWN = (
    "Deletions are unknown (name the pre-labeling job, prelabel_job, to count them): accepted = source auto, "
    "edited = semi-auto (also shapes drawn with AI tools), missed = manual; acceptance_rate = accepted / "
    "(accepted + edited) is an upper bound."
)


class CorrectionsRequest(BaseModel):
    """Which task to report on, how to log in to its CVAT, and optionally the job that pre-labelled it."""

    model_config = ConfigDict(extra="forbid")

    task: CvatTaskSource = Field(
        description="The CVAT task, and a way to log in: profile, token, or username and password."
    )
    prelabel_job: str | None = Field(
        default=None,
        min_length=1,
        description="The labelserve job that uploaded the pre-labels into this task (its id): only with it "
        "are deleted pre-labels counted.",
    )


def corrections_report(
    store: JobStore | None, settings: Settings, request: CorrectionsRequest
) -> dict[str, Any]:
    """The report as JSON-ready data; `store` holds the named pre-labeling job (None: no job store, so no
    prelabel_job). ApiError (4xx) for a job that did not upload into this task, or a task without
    pre-labels."""
    uploaded = None
    if request.prelabel_job is not None:
        if store is None:
            raise ApiError(400, "unknown_job", f"No job store to find job {request.prelabel_job!r} in.")
        uploaded = _uploaded(store, settings, request)
    from server.cvat.annotations import task_objects  # imports cvat-sdk

    with Connections(settings) as connections:
        task = connections.task(request.task)
        objects = task_objects(connections, request.task)
        labels = {int(label.id): str(label.name) for label in task.labels}
        where = task.describe()
    if uploaded is None and not has_prelabels(objects):
        raise ApiError(
            400,
            "no_prelabels",
            f"{where} has no pre-labels: none of its annotations has source auto or semi-auto. Pre-label it "
            "first (a job with output.cvat_task), then report once people have reviewed it.",
        )
    counted = count_corrections(objects, labels, uploaded)
    return {
        "task": {"id": request.task.task_id, "url": task.url},
        "prelabel_job": request.prelabel_job,
        "deletions_known": counted.deletions_known,
        "note": NOTE_KNOWN if counted.deletions_known else NOTE_UNKNOWN,
        "classes": [row_of(c) for c in counted.classes],
        "total": row_of(counted.total),
    }


def report_rows(report: dict[str, Any]) -> tuple[tuple[str, ...], list[dict[str, Any]]]:
    """The CSV's columns and rows: every class, then the total."""
    return COLUMNS, [*report["classes"], report["total"]]


def _uploaded(store: JobStore, settings: Settings, request: CorrectionsRequest) -> dict[tuple[str, int], int]:
    """(kind, CVAT id) → CVAT label id of what the named job uploaded into the request's task."""
    job_id = request.prelabel_job
    assert job_id is not None
    row = store.job(job_id)
    if row is None:
        raise ApiError(404, "unknown_job", f"No job {job_id!r}; GET /v1/jobs lists the jobs.")
    output = JobSpec.model_validate_json(row.spec).output.cvat_task
    if output is None:
        raise ApiError(
            400,
            "not_a_cvat_upload",
            f"Job {job_id} wrote files and uploaded nothing into CVAT; name the job that uploaded into the "
            "task, or leave out prelabel_job.",
        )
    if output.task_id != request.task.task_id or _server(output, settings) != _server(request.task, settings):
        raise ApiError(
            400,
            "wrong_task",
            f"Job {job_id} uploaded into task {output.task_id} on {_server(output, settings)}, not into "
            f"task {request.task.task_id} on {_server(request.task, settings)}.",
        )
    if row.state != "completed":
        raise ApiError(
            409,
            "job_unfinished",
            f"Job {job_id} is {row.state}: report once it has completed (resume it if it failed).",
        )
    found = store.uploaded(job_id)
    progress = store.upload(job_id)
    if not found and progress is not None and progress.shapes + progress.tags > 0:
        raise ApiError(
            409,
            "upload_unrecorded",
            f"Job {job_id} uploaded before labelserve recorded the CVAT ids of its pre-labels; leave out "
            "prelabel_job for a report without deletions.",
        )
    if not found:
        raise ApiError(
            400,
            "no_prelabels",
            f"Job {job_id} uploaded no annotation into task {output.task_id}: there are no pre-labels to "
            "report on.",
        )
    return {(a.kind, a.cvat_id): a.label_id for a in found}


def _server(connection: CvatConnection, settings: Settings) -> str:
    """The CVAT server a connection goes to (a profile's URL), for comparing two of them."""
    url = connection.url
    if connection.profile is not None:
        profile = settings.cvat_profiles.get(connection.profile)
        url = profile.url if profile is not None else f"profile {connection.profile}"
    return server_key(url)


def latest_upload(store: JobStore, settings: Settings, task: CvatTaskSource) -> str | None:
    """The newest completed job of the store that uploaded into `task`, if any."""
    for row in store.jobs(["completed"]):
        output = JobSpec.model_validate_json(row.spec).output.cvat_task
        same = output is not None and output.task_id == task.task_id
        if same and _server(output, settings) == _server(task, settings):
            return row.id
    return None
