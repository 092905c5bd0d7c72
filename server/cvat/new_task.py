"""A new CVAT task made of chosen images of a CVAT cloud storage, in a given order, through cvat-sdk: the
task's data are the objects' keys (`server_files`) with `cloud_storage_id`, the storage's manifest and
`sorting_method: predefined`, so CVAT reads the images from the bucket and no bytes pass through here."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from server.cvat.spec import CvatNewTask
from server.cvat.tasks import Connections, cvat_errors
from server.errors import ApiError

log = logging.getLogger("labelserve.jobs.cvat")


@dataclass(frozen=True)
class CreatedTask:
    id: int
    url: str  # the task's page


def check_storage(connections: Connections, target: CvatNewTask, storage_id: int, bucket: str | None) -> str:
    """The manifest to use, after checking that the cloud storage exists, is the S3 bucket `bucket` (when
    given), and has that manifest attached. ApiError 400 otherwise."""
    client = connections.client(target)
    url = client.api_map.host
    try:
        with cvat_errors(f"reading cloud storage {storage_id}", url):
            storage = client.api_client.cloudstorages_api.retrieve(storage_id)[0]
    except ApiError as exc:
        if "HTTP 404" in exc.message or "HTTP 403" in exc.message:
            raise ApiError(
                400,
                "cvat_cloud_storage_not_found",
                f"CVAT at {url} has no cloud storage {storage_id} (or the user cannot see it).",
            ) from None
        raise
    if bucket is not None and (
        str(storage.provider_type) != "AWS_S3_BUCKET" or str(storage.resource) != bucket
    ):
        raise ApiError(
            400,
            "wrong_bucket",
            f"CVAT cloud storage {storage_id} is {storage.provider_type} {storage.resource!r}, but the "
            f"pool's images are in S3 bucket {bucket!r}: give the cloud storage attached to that bucket.",
        )
    manifests = [str(m) for m in storage.manifests or ()]
    if target.manifest is not None and target.manifest not in manifests:
        raise ApiError(
            400,
            "manifest_not_attached",
            f"CVAT cloud storage {storage_id} has no manifest {target.manifest!r} attached (it has "
            f"{manifests or 'none'}): attach it in CVAT, or name one of those.",
        )
    if not manifests:
        raise ApiError(
            400,
            "manifest_not_attached",
            f"CVAT cloud storage {storage_id} has no manifest attached: make one (cvat's "
            "utils/dataset_manifest) listing the pool's images, put it in the bucket and attach it in CVAT.",
        )
    return target.manifest or manifests[0]


def create_task(
    connections: Connections, target: CvatNewTask, storage_id: int, keys: list[str], manifest: str
) -> CreatedTask:
    """Make the task: `keys` (object keys in the storage's bucket) are its frames, in this order.
    ApiError when CVAT refuses (e.g. a key its manifest does not list)."""
    from cvat_sdk import models
    from cvat_sdk.core.exceptions import BackgroundRequestException
    from cvat_sdk.core.proxies.tasks import ResourceType

    client = connections.client(target)
    url = client.api_map.host
    spec: dict[str, Any] = {"name": target.name}
    if target.labels is not None:
        spec["labels"] = [models.PatchedLabelRequest(name=x.name, type=x.type) for x in target.labels]
    if target.project_id is not None:
        spec["project_id"] = target.project_id
    if target.segment_size is not None:
        spec["segment_size"] = target.segment_size
    data = {
        "cloud_storage_id": storage_id,
        "sorting_method": "predefined",  # the frames keep the ranking's order
        "use_cache": True,  # CVAT reads cloud storage data on demand: nothing is copied
        "image_quality": 70,
    }
    try:
        with cvat_errors("creating a task", url):
            task = client.tasks.create_from_data(
                models.TaskWriteRequest(**spec),
                [*keys, manifest],  # CVAT takes the .jsonl among server_files as the manifest
                resource_type=ResourceType.SHARE,
                data_params=data,
            )
    except BackgroundRequestException as exc:
        raise ApiError(502, "cvat_rejected", f"CVAT at {url} could not make the task's data: {exc}") from None
    log.info("created CVAT task %s with %d images from cloud storage %s", task.id, len(keys), storage_id)
    return CreatedTask(int(task.id), f"{url.rstrip('/')}/tasks/{task.id}")
