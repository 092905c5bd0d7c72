"""Sample jobs: which images of a pool to annotate next. The detector runs over the pool as in a
pre-labeling job (same items, batches, progress, cancel and resume), and each image's SAM embedding (through
the cache) is stored with its detections. When every image is done, server.services.sampling picks the
budget: the most uncertain images first, then k-center greedy among them for diversity. With
`sample.cvat_task` the picks also become a new CVAT task, in rank order, from the CVAT cloud storage the pool
is in (its bucket's, or the pool CVAT task's; server.cvat.new_task): checked at submit, made once (the store
remembers it)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from server.cvat.tasks import Connections
from server.errors import ApiError
from server.formats.ranking import Pick, embedding_of, write_ranking
from server.formats.stored import shape_from_dict
from server.inputs.objectstore.locations import is_s3_url, parse_s3_url
from server.jobs.control import JobFailed
from server.jobs.outputs import output_directory
from server.jobs.spec import JobSpec
from server.jobs.store import JobStore
from server.services.collections import ImageEntry
from server.services.sampling import image_uncertainty, select
from server.settings import Settings


def check_budget(spec: JobSpec, pool: int) -> None:
    assert spec.sample is not None
    if spec.sample.budget > pool:
        raise ApiError(
            400,
            "budget_too_large",
            f"The budget ({spec.sample.budget}) is larger than the pool ({pool} images): lower it.",
        )


@dataclass(frozen=True)
class PoolData:
    """Where a new task's images come from: a CVAT cloud storage, and the objects' keys in it."""

    storage_id: int
    bucket: str | None  # the bucket the storage must be; None: the storage the pool's CVAT task reads
    keys: list[str]  # in the order given


def pool_data(spec: JobSpec, refs: list[str], connections: Connections) -> PoolData:
    """The cloud storage and keys of these images of the pool: a CVAT task's frames in a cloud storage (its
    frame names are the objects' keys), or s3:// images of one bucket. ApiError 400 otherwise."""
    target = spec.new_task()
    assert target is not None
    source = spec.source.cvat_task
    if source is not None:
        task = connections.task(source)
        storage_id = getattr(task.task, "data_cloud_storage_id", None)
        if storage_id is None or task.task.data_original_chunk_type != "imageset":
            raise ApiError(
                400,
                "pool_not_in_cloud_storage",
                f"The images of {task.describe()} are not in a CVAT cloud storage, so a new task cannot take "
                "them without copying; leave out sample.cvat_task and use ranking.json.",
            )
        if connections.client(target).api_map.host != task.url:
            raise ApiError(
                400,
                "wrong_cvat",
                f"The pool is {task.describe()}: make the new task on that CVAT server, whose cloud storage "
                "holds the images.",
            )
        if target.cloud_storage_id not in (None, storage_id):
            raise ApiError(
                400,
                "wrong_cloud_storage",
                f"The images of {task.describe()} are in cloud storage {storage_id}, not "
                f"{target.cloud_storage_id}: leave out cloud_storage_id, or give {storage_id}.",
            )
        names = {frame.index: frame.name for frame in task.frames}
        return PoolData(int(storage_id), None, [names[int(ref.rsplit("/", 1)[1])] for ref in refs])
    buckets = {parse_s3_url(ref).bucket for ref in refs if is_s3_url(ref)}
    if len(buckets) != 1 or not all(is_s3_url(ref) for ref in refs):
        raise ApiError(
            400,
            "pool_not_in_cloud_storage",
            "A new CVAT task is made from a CVAT cloud storage, so the pool must be images of one S3 bucket "
            "(source.directory s3://bucket/prefix, or an s3:// manifest) or a CVAT task whose data are in a "
            "cloud storage; put a local pool in the bucket of a cloud storage first, or leave out "
            "sample.cvat_task and use ranking.json.",
        )
    if target.cloud_storage_id is None:
        raise ApiError(
            422,
            "cloud_storage_required",
            "sample.cvat_task needs cloud_storage_id: the CVAT cloud storage attached to the pool's bucket.",
        )
    return PoolData(target.cloud_storage_id, buckets.pop(), [parse_s3_url(ref).key for ref in refs])


def check_new_task(spec: JobSpec, entries: list[ImageEntry], settings: Settings) -> None:
    """Before anything is stored: the pool is in a CVAT cloud storage that has a manifest, and the new
    task's CVAT accepts the credentials (ApiError 4xx otherwise)."""
    target = spec.new_task()
    if target is None:
        return
    from server.cvat.new_task import check_storage  # imports cvat-sdk

    with Connections(settings) as connections:
        pool = pool_data(spec, [ref for ref, _ in entries], connections)
        check_storage(connections, target, pool.storage_id, pool.bucket)


def write_sample(store: JobStore, job_id: str, spec: JobSpec, settings: Settings) -> str | None:
    """Pick, write ranking.json and ranking.csv, and make the new CVAT task if asked; its page, if any."""
    sample, target = spec.sample, spec.output.directory
    assert sample is not None and target is not None
    indices, names, refs, confidences, vectors, failed = [], [], [], [], [], 0
    for item in store.items(job_id):
        if item.status != "done" or item.result is None:
            failed += 1
            continue
        shapes = [shape_from_dict(d) for d in json.loads(item.result)]
        vector = next((v for s in shapes if (v := embedding_of(s)) is not None), None)
        if vector is None:
            failed += 1
            continue
        indices.append(item.index)
        names.append(item.name)
        refs.append(item.ref)
        confidences.append([s.score for s in shapes if s.score is not None and s.kind != "tag"])
        vectors.append(vector)
    if not vectors:
        raise JobFailed("no image of the pool could be read and embedded")
    budget = min(sample.budget, len(vectors))  # failed images cannot be picked
    uncertainty = image_uncertainty(confidences, sample.uncertainty)
    chosen = select(np.stack(vectors), uncertainty, budget, sample.prefilter, sample.seed)
    picks = [
        Pick(rank, indices[i], names[i], float(uncertainty[i])) for rank, i in enumerate(chosen, start=1)
    ]
    summary = {
        "detector": spec.detector,
        "embedding": sample.embedding,
        "embeddings": sample.embeddings,
        "pool": len(vectors),
        "failed": failed,
        "budget": sample.budget,
        "picked": len(picks),
        "uncertainty": sample.uncertainty,
        "prefilter": sample.prefilter,
        "seed": sample.seed,
    }
    page = None
    if sample.cvat_task is not None:
        page = _new_task(store, job_id, spec, [refs[i] for i in chosen], settings)
        summary["cvat_task"] = page
    with output_directory(target, job_id, settings, "ranking") as directory:
        write_ranking(directory, picks, summary)
    return page


def _new_task(store: JobStore, job_id: str, spec: JobSpec, refs: list[str], settings: Settings) -> str:
    """Make the CVAT task of the picks (once: a resumed job finds the one it made); its page."""
    made = store.created_task(job_id)
    if made is not None:
        return made[1]
    from server.cvat.new_task import check_storage, create_task  # imports cvat-sdk

    target = spec.new_task()
    assert target is not None
    try:
        with Connections(settings) as connections:
            pool = pool_data(spec, refs, connections)
            manifest = check_storage(connections, target, pool.storage_id, pool.bucket)
            created = create_task(connections, target, pool.storage_id, pool.keys, manifest)
    except ApiError as exc:
        raise JobFailed(f"making the CVAT task failed: {exc.message} Resume the job to retry.") from None
    store.set_created_task(job_id, created.id, created.url)
    return created.url
