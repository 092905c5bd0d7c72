"""A review's findings as CVAT issues on a job, through cvat-sdk (`IssueWriteRequest`: frame, position, job,
message; CVAT stores the message as the issue's first comment).

Idempotent: each message carries a machine tag with a key derived from the finding, and the job's comments
are read first, so a rerun (or a resumed job) adds no issue whose key is already there. The findings are
taken in rank order, at most `per_frame` on a frame and `top_k` in all, so a rerun picks the same ones.
Frames are the task's frame numbers, matched to the findings' image names (relative path, else a file name
only one frame has); findings on frames outside the job are left to that frame's job.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.cvat.spec import CvatIssuesOutput, CvatTaskSource
from server.cvat.tasks import Connections, cvat_errors
from server.errors import ApiError
from server.formats.findings import Finding

TAG = "labelserve review v1"
_KEY = re.compile(r"\[" + re.escape(TAG) + r" [^\]]*\bkey=([0-9a-f]{12})\b")


@dataclass(frozen=True)
class IssuesWritten:
    written: int  # new issues
    existing: int  # chosen findings whose issue was already there
    outside: int  # findings on frames of other jobs, or on images the task does not have


def issue_key(finding: Finding) -> str:
    """Stable over reruns: what the finding is about, not its score."""
    box = finding.suggested_box if finding.shape_id is None else None
    about = [finding.kind, finding.image, finding.shape_id, finding.label, [round(v) for v in box or ()]]
    return hashlib.sha256(json.dumps(about).encode()).hexdigest()[:12]


def issue_message(finding: Finding, model: str) -> str:
    tag = f"[{TAG} kind={finding.kind} score={finding.score:.3f} model={model} key={issue_key(finding)}]"
    return f"{tag} {_sentence(finding)}"


def _sentence(f: Finding) -> str:
    box = ",".join(str(round(v)) for v in f.suggested_box) if f.suggested_box else ""
    conf = f" (model confidence {f.model_score:.2f})" if f.model_score is not None else ""
    if f.kind == "missing":
        return f"Possible missing '{f.label}'{conf}. Suggested box {box}."
    if f.kind == "badloc":
        return f"This '{f.label}' box looks off; the model's box is {box}{conf}."
    if f.kind == "swap":
        return f"This '{f.label}' may be a '{f.suggested_label}'{conf}."
    if f.kind == "spurious":
        return f"The model sees nothing under this '{f.label}' box; is it needed?"
    return f"This '{f.label}' outline and SAM's mask overlap only IoU {f.iou or 0:.2f}: a sloppy edge?"


def write_issues(
    connections: Connections, target: CvatIssuesOutput, findings: Sequence[Finding], model: str
) -> IssuesWritten:
    """Write the top findings as issues on the job (ApiError when CVAT refuses or fails)."""
    from cvat_sdk.api_client import models
    from cvat_sdk.core.helpers import get_paginated_collection

    client = connections.client(target)
    url = client.api_map.host
    job = check_job(connections, target)
    source = CvatTaskSource(**target.connection().model_dump(), task_id=job.task_id)
    frames = _frame_numbers(connections, source)
    with cvat_errors(f"reading the comments of job {target.job_id}", url):
        comments = get_paginated_collection(
            client.api_client.comments_api.list_endpoint, job_id=target.job_id
        )
    existing = {m[1] for c in comments if (m := _KEY.search(str(c.message or "")))}
    on_frame: Counter[int] = Counter()
    written = already = outside = 0
    for finding in findings:
        if written + already >= target.top_k:
            break
        frame = frames.get(finding.image, frames.get(posixpath.basename(finding.image)))
        if frame is None or not job.start_frame <= frame <= job.stop_frame:
            outside += 1
            continue
        if on_frame[frame] >= target.per_frame:
            continue
        on_frame[frame] += 1
        if issue_key(finding) in existing:
            already += 1
            continue
        position = finding.box or finding.suggested_box
        assert position is not None
        request = models.IssueWriteRequest(
            frame=frame,
            position=[float(v) for v in position],
            job=target.job_id,
            message=issue_message(finding, model),
        )
        with cvat_errors(f"writing an issue on job {target.job_id}", url):
            client.issues.create(request)
        written += 1
    return IssuesWritten(written, already, outside)


def check_job(connections: Connections, target: CvatIssuesOutput) -> Any:
    """The job (cvat-sdk's proxy); ApiError 400 when CVAT has no such job for this user."""
    client = connections.client(target)
    url = client.api_map.host
    try:
        with cvat_errors(f"reading job {target.job_id}", url):
            return client.jobs.retrieve(target.job_id)
    except ApiError as exc:
        if exc.code == "cvat_rejected" and "HTTP 404" in exc.message:
            raise ApiError(
                400,
                "cvat_job_not_found",
                f"CVAT at {url} has no job {target.job_id} (or the user cannot see it).",
            ) from None
        raise


def _frame_numbers(connections: Connections, source: CvatTaskSource) -> dict[str, int]:
    """Image name -> frame number: by relative path, and by file name where only one frame has it."""
    task = connections.task(source)
    by_file: dict[str, list[int]] = {}
    for frame in task.frames:
        by_file.setdefault(posixpath.basename(frame.name), []).append(frame.index)
    numbers = {posixpath.basename(n): i[0] for n, i in by_file.items() if len(i) == 1}
    return numbers | {frame.name: frame.index for frame in task.frames}
