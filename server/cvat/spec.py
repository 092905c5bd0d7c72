"""The CVAT-task parts of a job spec: a task as the source (its frames) or as the output (an upload).

Credentials are `SecretStr`: a spec dumped to JSON (what the job database stores and every response shows)
carries `"**********"` instead of them. The engine keeps the real values apart (`secrets()`), in the job
database's secrets table until the job completes, and puts them back (`with_secrets`) to run or resume it.
A `profile` names credentials in the server's settings instead (LABELSERVE_CVAT_PROFILES), which keeps them
out of the job database altogether.
"""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

REDACTED = "**********"  # what pydantic writes for a SecretStr; a stored spec holds this, never a secret
_CONNECTION_FIELDS = ("url", "profile", "token", "username", "password", "organization")


class CvatConnection(BaseModel):
    """A CVAT server and how to log in: a server-side `profile`, or `token`, or `username` + `password`."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(
        default=None,
        description="CVAT's address, e.g. https://app.cvat.ai; a profile has one.",
    )
    profile: str | None = Field(
        default=None, description="Credentials configured on the server (LABELSERVE_CVAT_PROFILES)."
    )
    token: SecretStr | None = Field(default=None, description="A CVAT personal access token.")
    username: str | None = None
    password: SecretStr | None = None
    organization: str | None = Field(
        default=None, description="Organization slug the task belongs to (CVAT's X-Organization)."
    )

    def _check_login(self) -> None:
        ways = [self.profile is not None, self.token is not None, self.username is not None]
        if sum(ways) != 1:
            raise ValueError("give exactly one of profile, token, or username and password")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if self.profile is None and not self.url:
            raise ValueError("url is required unless a profile gives it")

    def connection(self) -> CvatConnection:
        return CvatConnection(**{name: getattr(self, name) for name in _CONNECTION_FIELDS})

    def secrets(self) -> dict[str, str]:
        """The secret values, to store apart from the spec."""
        found = {"token": self.token, "password": self.password}
        return {name: value.get_secret_value() for name, value in found.items() if value is not None}

    def with_secrets(self, secrets: dict[str, str]) -> Self:
        return self.model_copy(update={name: SecretStr(value) for name, value in secrets.items()})

    def secrets_missing(self) -> bool:
        """True for a stored spec whose secrets were not put back."""
        return any(v is not None and v.get_secret_value() == REDACTED for v in (self.token, self.password))


class CvatTaskSource(CvatConnection):
    """Pre-label a CVAT task's own frames; output names are the task's frame names."""

    task_id: int = Field(ge=1)

    @model_validator(mode="after")
    def _login(self) -> CvatTaskSource:
        self._check_login()
        return self


class CvatTaskOutput(CvatConnection):
    """Upload the results into a CVAT task; without `task_id` (and connection fields), the source task."""

    task_id: int | None = Field(default=None, ge=1)
    label_map: dict[str, str | None] = Field(
        default_factory=dict,
        description="Model label → CVAT label name, for names that differ; null drops that model label. "
        "Other labels map to the CVAT label of the same name (case-sensitive, as in CVAT).",
    )
    allow_unmatched: bool = Field(
        default=False,
        description="Drop detections whose label (or skeleton point) has no CVAT counterpart instead of "
        "refusing the job.",
    )
    clear_existing: bool = Field(
        default=False, description="Replace the task's annotations; by default they are added to."
    )
    conv_mask_to_poly: bool = Field(
        default=False, description="Upload masks as polygons (their largest outline), as CVAT's option."
    )

    @model_validator(mode="after")
    def _login(self) -> CvatTaskOutput:
        if self.task_id is None:
            given = [name for name in _CONNECTION_FIELDS if getattr(self, name) is not None]
            if given:
                raise ValueError(f"without task_id the source task is used; leave out {', '.join(given)}")
        else:
            self._check_login()
        return self

    def targeting(self, source: CvatTaskSource) -> CvatTaskOutput:
        """This output with the source task's task id and connection filled in."""
        update: dict[str, Any] = {name: getattr(source, name) for name in _CONNECTION_FIELDS}
        return self.model_copy(update=update | {"task_id": source.task_id})

    def same_task(self, source: CvatTaskSource | None) -> bool:
        """Whether the upload goes back into the source task (frames then match by index, not by name)."""
        if source is None or self.task_id != source.task_id:
            return False
        return (self.profile, server_key(self.url)) == (source.profile, server_key(source.url))


class CvatIssuesOutput(CvatConnection):
    """Write a review's findings as issues on a CVAT job, idempotently (a key in each message)."""

    job_id: int = Field(ge=1, description="The CVAT job the issues go on (its frames are reviewed).")
    top_k: int = Field(default=50, ge=1, le=10_000, description="At most this many labelserve issues.")
    per_frame: int = Field(default=5, ge=1, le=1000, description="At most this many issues on one frame.")

    @model_validator(mode="after")
    def _login(self) -> CvatIssuesOutput:
        self._check_login()
        return self


class NewTaskLabel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    type: Literal["any", "rectangle", "polygon", "polyline", "points", "ellipse", "cuboid", "mask", "tag"] = (
        Field(
            default="any", description="The shapes the label takes (skeletons need sublabels: use a project)."
        )
    )


class CvatNewTask(CvatConnection):
    """A new CVAT task whose data are images of a CVAT cloud storage, in a given order (a sample job's
    picks): made through cvat-sdk from the storage's files and manifest, so no image bytes are copied."""

    name: str = Field(min_length=1, max_length=256, description="The new task's name.")
    cloud_storage_id: int | None = Field(
        default=None,
        ge=1,
        description="The CVAT cloud storage attached to the bucket the pool's images are in; absent for a "
        "pool that is a CVAT task: the cloud storage its data come from.",
    )
    manifest: str | None = Field(
        default=None,
        min_length=1,
        description="The manifest.jsonl of that storage listing the images (its key, as attached in CVAT); "
        "absent: the storage's first attached manifest.",
    )
    labels: list[NewTaskLabel] | None = Field(
        default=None, description="The task's labels; or project_id, whose labels a task in it has."
    )
    project_id: int | None = Field(default=None, ge=1, description="Make the task in this CVAT project.")
    segment_size: int | None = Field(
        default=None, ge=1, description="Images per CVAT job (jobs keep the ranked order); absent: CVAT's."
    )

    @model_validator(mode="after")
    def _login(self) -> CvatNewTask:
        self._check_login()
        if (self.labels is None) == (self.project_id is None):
            raise ValueError("give the new task labels, or a project_id (its labels), not both")
        if self.labels is not None and len({label.name for label in self.labels}) != len(self.labels):
            raise ValueError("label names must be unique")
        return self


def server_key(url: str | None) -> str:
    """A CVAT server's address as compared: without a trailing slash, case-folded ("" for none)."""
    return url.rstrip("/").lower() if url else ""
