"""Sample jobs: which images of a pool to annotate next. The detector runs over the pool as in a
pre-labeling job (same items, batches, progress, cancel and resume), and each image's SAM embedding (through
the cache) is stored with its detections. When every image is done, server.services.sampling picks the
budget: the most uncertain images first, then k-center greedy among them for diversity. With
`sample.cvat_task` the picks also become a new CVAT task, in rank order, from the CVAT cloud storage of the
pool's bucket (server.cvat.new_task): checked at submit, made once (the store remembers it)."""

from __future__ import annotations

import json

import numpy as np

from server.cvat.spec import CvatNewTask
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


def pool_bucket(refs: list[str]) -> str:
    """The one S3 bucket every image of the pool is in; ApiError 400 otherwise (a new CVAT task takes its
    images from a cloud storage, by key)."""
    buckets = {parse_s3_url(ref).bucket for ref in refs if is_s3_url(ref)}
    if len(buckets) != 1 or not all(is_s3_url(ref) for ref in refs):
        raise ApiError(
            400,
            "pool_not_in_cloud_storage",
            "A new CVAT task is made from a CVAT cloud storage, so the pool must be images of one S3 bucket "
            "(source.directory s3://bucket/prefix, or an s3:// manifest); put a local pool in the bucket of "
            "a cloud storage first, or leave out sample.cvat_task and use ranking.json.",
        )
    return buckets.pop()


def check_new_task(spec: JobSpec, entries: list[ImageEntry], settings: Settings) -> None:
    """Before anything is stored: the pool is in one bucket, and the CVAT cloud storage is that bucket
    with a manifest (ApiError 4xx otherwise)."""
    target = spec.new_task()
    if target is None:
        return
    from server.cvat.new_task import check_storage  # imports cvat-sdk

    bucket = pool_bucket([ref for ref, _ in entries])
    with Connections(settings) as connections:
        check_storage(connections, target, bucket)


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
        page = _new_task(store, job_id, sample.cvat_task, [refs[i] for i in chosen], settings)
        summary["cvat_task"] = page
    with output_directory(target, job_id, settings, "ranking") as directory:
        write_ranking(directory, picks, summary)
    return page


def _new_task(store: JobStore, job_id: str, target: CvatNewTask, refs: list[str], settings: Settings) -> str:
    """Make the CVAT task of the picks (once: a resumed job finds the one it made); its page."""
    made = store.created_task(job_id)
    if made is not None:
        return made[1]
    from server.cvat.new_task import check_storage, create_task  # imports cvat-sdk

    keys = [parse_s3_url(ref).key for ref in refs]
    try:
        with Connections(settings) as connections:
            manifest = check_storage(connections, target, pool_bucket(refs))
            created = create_task(connections, target, keys, manifest)
    except ApiError as exc:
        raise JobFailed(f"making the CVAT task failed: {exc.message} Resume the job to retry.") from None
    store.set_created_task(job_id, created.id, created.url)
    return created.url
