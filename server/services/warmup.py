"""Warm embeddings before the annotator arrives: CVAT says which job someone starts (webhooks), and an AI
agent's click says which frame they are on (look-ahead). Both become prefetch runs (prefetch.py here) over
a CVAT task's frames, read from the task's bucket or through CVAT (server/cvat/tasks.py).

Webhooks: CVAT signs each delivery with the profile's webhook secret (X-Signature-256: sha256=HMAC of the
body). `update:job` starts a run over the job's frames in frame order when the job gets an assignee or goes
"in progress"; the run is cancelled when the job is completed or loses its assignee, and restarted when it
is reassigned. One run per job and model: a duplicate delivery joins the active run. Frames already
embedded by an earlier run are counted as cached without being read again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.cvat.spec import CvatTaskSource
from server.cvat.tasks import FRAME_REF, Connections
from server.errors import ApiError
from server.lru import ByteLRU
from server.services.prefetch import PrefetchItem, PrefetchManager, PrefetchStatus, Prepared, Urgency
from server.settings import Settings

log = logging.getLogger("labelserve.cvat.warmup")

SIGNATURE_HEADER = "X-Signature-256"
FRAME_IDS_KEPT = 200_000  # (profile, frame ref) → image id of frames embedded before

Action = Literal["start", "restart", "cancel", "ignore"]


@dataclass(frozen=True)
class Frames:
    """Frames of a task to warm, in frame order: those numbered first..last (inclusive), at most `limit`."""

    task_id: int
    first: int
    last: int | None
    limit: int
    what: str  # for run origins and logs: "job 12", "task 3", "look-ahead from frame 40"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    key: str | None = None  # the run's key ("job:12:alice", "task:3"); to cancel, a prefix of keys
    frames: Frames | None = None


def signature_of(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def check_signature(secret: str, body: bytes, header: str | None) -> None:
    """ApiError 401 unless `header` is the body's signature with `secret` (compared in constant time)."""
    if not header:
        raise ApiError(
            401,
            "missing_signature",
            f"The delivery has no {SIGNATURE_HEADER} header; give the CVAT webhook this profile's "
            "webhook_secret as its secret.",
        )
    if not hmac.compare_digest(header.strip().encode(), signature_of(secret, body).encode()):
        raise ApiError(
            401,
            "bad_signature",
            f"{SIGNATURE_HEADER} does not match the body: the webhook's secret differs from this profile's "
            "webhook_secret, or the body was changed.",
        )


def decide(payload: dict[str, Any], budget: int, new_tasks: bool) -> Decision:
    """What a delivery asks for. Pure: no I/O."""
    event = str(payload.get("event", ""))
    if event == "ping":
        return Decision("ignore", "ping: the webhook reaches labelserve and its signature checks out")
    if event == "update:job":
        return _job_decision(payload.get("job") or {}, payload.get("before_update") or {}, budget)
    if event == "create:task" or event == "completed:request[create:task]":
        if not new_tasks:
            return Decision(
                "ignore", f"{event}: new tasks are not prefetched (LABELSERVE_CVAT_PREFETCH_NEW_TASKS)"
            )
        task_id = _task_of(payload)
        if task_id is None:
            return Decision("ignore", f"{event}: no task id, or the task has no data yet")
        return Decision(
            "start",
            f"{event}: task {task_id}'s data is ready",
            f"task:{task_id}",
            Frames(task_id, 0, None, budget, f"new task {task_id}"),
        )
    return Decision("ignore", f"{event or 'no event'}: not an event labelserve acts on")


def _job_decision(job: dict[str, Any], before: dict[str, Any], budget: int) -> Decision:
    try:
        job_id, task_id = int(job["id"]), int(job["task_id"])
        first, last = int(job["start_frame"]), int(job["stop_frame"])
    except (KeyError, TypeError, ValueError):
        return Decision("ignore", "update:job without the job's id, task_id, start_frame and stop_frame")
    # A run is keyed by job and assignee: a redelivery joins the active run, a reassignment replaces it.
    assignee = (job.get("assignee") or {}).get("username")
    key = f"job:{job_id}:{assignee}"
    frames = Frames(task_id, first, last, budget, f"job {job_id}")
    if job.get("type") == "ground_truth":
        return Decision("ignore", f"job {job_id} is a ground-truth job (its frames are not a range)")
    if job.get("state") == "completed":
        return Decision("cancel", f"job {job_id} is completed", f"job:{job_id}:")
    if "assignee" in before:
        if assignee is None:
            return Decision("cancel", f"job {job_id} has no assignee any more", f"job:{job_id}:")
        verb = "reassigned" if before["assignee"] is not None else "assigned"
        return Decision("restart", f"job {job_id} was {verb} to {assignee}", key, frames)
    if "state" in before and job.get("state") == "in progress":
        return Decision("start", f"job {job_id} is in progress", key, frames)
    changed = ", ".join(sorted(before)) or "nothing"
    return Decision("ignore", f"job {job_id}: {changed} changed; no assignee or start to act on")


def _task_of(payload: dict[str, Any]) -> int | None:
    task = payload.get("task")
    if isinstance(task, dict):
        return int(task["id"]) if task.get("id") and task.get("size") else None
    request = payload.get("request")
    if isinstance(request, dict) and request.get("status") == "finished":
        task_id = (request.get("operation") or {}).get("task_id")
        return int(task_id) if task_id else None
    return None


class LookaheadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile: str = Field(min_length=1, description="The CVAT profile (LABELSERVE_CVAT_PROFILES) of the task.")
    task_id: int = Field(ge=1)
    frame: int = Field(ge=0, description="The frame the annotator is on; the frames after it are warmed.")
    count: int = Field(
        default=4, ge=1, description="How many frames after it (at most LABELSERVE_CVAT_LOOKAHEAD_MAX)."
    )
    model: str | None = Field(default=None, description="The SAM model; default: those CVAT prefetch warms.")


class Warmup:
    """Turns webhook deliveries and look-ahead requests into prefetch runs. Knows no HTTP."""

    def __init__(
        self, prefetch: PrefetchManager, settings: Settings, segmenters: Callable[[], list[str]]
    ) -> None:
        self.prefetch = prefetch
        self.settings = settings
        self._segmenters = segmenters  # the SAM models being served
        self._frame_ids: dict[str, ByteLRU[str]] = {}
        self._lock = threading.Lock()

    # -- webhooks ---------------------------------------------------------------------------------------
    def webhook(self, profile: str, body: bytes, signature: str | None) -> dict[str, Any]:
        """Check a delivery, then act on it. ApiError: 404 unknown profile, 403 no secret, 401 signature,
        400 not JSON; 503 when the prefetch queue is full (CVAT retries 5xx deliveries)."""
        secret = self._profile(profile).webhook_secret
        if secret is None:
            raise ApiError(
                403,
                "webhooks_not_configured",
                f"CVAT profile {profile!r} has no webhook_secret, so its webhooks are refused; set one in "
                "LABELSERVE_CVAT_PROFILES and give CVAT's webhook the same secret.",
            )
        check_signature(secret.get_secret_value(), body, signature)
        try:
            payload = json.loads(body)
        except ValueError:
            raise ApiError(400, "bad_webhook", "The delivery is not JSON.") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "bad_webhook", "The delivery is not a JSON object.")
        settings = self.settings
        decision = decide(payload, settings.cvat_prefetch_frames, settings.cvat_prefetch_new_tasks)
        log.info("cvat webhook (%s): %s: %s", profile, decision.action, decision.reason)
        runs: list[PrefetchStatus] = []
        if decision.action == "cancel":
            runs += self._cancel(profile, decision.key, keep=None)
        if decision.action in ("start", "restart"):
            assert decision.frames is not None and decision.key is not None
            if decision.action == "restart":  # the job's runs for anyone else
                runs += self._cancel(profile, decision.key.rsplit(":", 1)[0] + ":", keep=decision.key)
            runs += self._start(profile, decision.frames, decision.key, Urgency.JOB)
        return {
            "event": payload.get("event"),
            "action": decision.action,
            "reason": decision.reason,
            "runs": [run.model_dump() for run in runs],
        }

    # -- look-ahead -------------------------------------------------------------------------------------
    def lookahead(self, request: LookaheadRequest) -> list[PrefetchStatus]:
        """Warm the `count` frames after `frame`. A newer frame of the same task and model replaces the run
        of an older one; the same frame again joins its run."""
        self._profile(request.profile)
        if request.count > self.settings.cvat_lookahead_max:
            limit = self.settings.cvat_lookahead_max
            raise ApiError(
                422,
                "too_many_frames",
                f"count {request.count} is over LABELSERVE_CVAT_LOOKAHEAD_MAX ({limit}).",
            )
        frames = Frames(
            request.task_id, request.frame + 1, None, request.count, f"look-ahead from frame {request.frame}"
        )
        runs = []
        for model in [request.model] if request.model else self.models():
            key = f"lookahead:{request.task_id}:{request.frame}"
            older = self._key(request.profile, model, f"lookahead:{request.task_id}:")
            self.prefetch.cancel_keyed(older, spare=self._key(request.profile, model, key))
            runs += self._start(request.profile, frames, key, Urgency.LOOKAHEAD, [model])
        return runs

    # -- shared -----------------------------------------------------------------------------------------
    def models(self) -> list[str]:
        return list(self.settings.cvat_prefetch_models) or self._segmenters()

    def _profile(self, name: str) -> Any:
        profile = self.settings.cvat_profiles.get(name)
        if profile is None:
            known = ", ".join(sorted(self.settings.cvat_profiles)) or "none"
            raise ApiError(
                404,
                "unknown_cvat_profile",
                f"This server has no CVAT profile {name!r} (LABELSERVE_CVAT_PROFILES has: {known}).",
            )
        return profile

    @staticmethod
    def _key(profile: str, model: str, key: str) -> str:
        return f"cvat:{profile}:{model}:{key}"

    def _cancel(self, profile: str, prefix: str | None, keep: str | None) -> list[PrefetchStatus]:
        """Cancel the runs whose key starts with `prefix`, but for the one keyed `keep`."""
        assert prefix is not None
        cancelled = []
        for model in self.models():
            spared = self._key(profile, model, keep) if keep else None
            cancelled += self.prefetch.cancel_keyed(self._key(profile, model, prefix), spare=spared)
        return cancelled

    def _start(
        self, profile: str, frames: Frames, key: str | None, urgency: Urgency, models: list[str] | None = None
    ) -> list[PrefetchStatus]:
        runs = []
        for model in models or self.models():
            self.prefetch.sam.registry.segmenter(model)  # unknown (404) or unavailable (503) model
            status, _ = self.prefetch.start(
                model,
                lambda: self._prepare(profile, frames),
                urgency,
                origin=f"cvat {profile}: {frames.what}",
                key=self._key(profile, model, key) if key else None,
            )
            runs.append(status)
        return runs

    def _prepare(self, profile: str, frames: Frames) -> Prepared:
        """Runs on a prefetch set-up thread: lists the task's frames and opens the reader."""
        connections = Connections(self.settings)
        try:
            source = CvatTaskSource(profile=profile, task_id=frames.task_id)
            info = connections.task(source)
            chosen = [
                frame
                for frame in info.frames
                if frame.index >= frames.first and (frames.last is None or frame.index <= frames.last)
            ][: frames.limit]
            items = [
                PrefetchItem(
                    i,
                    f"task {info.id} frame {frame.index}",
                    FRAME_REF.format(task_id=info.id, index=frame.index),
                )
                for i, frame in enumerate(chosen)
            ]
            reader = connections.frame_reader(source) if items else None
        except BaseException:
            connections.close()
            raise
        return Prepared(items, reader, connections.close, self._ids(profile))

    def _ids(self, profile: str) -> ByteLRU[str]:
        with self._lock:
            if profile not in self._frame_ids:
                self._frame_ids[profile] = ByteLRU(FRAME_IDS_KEPT, lambda _: 1)
            return self._frame_ids[profile]
