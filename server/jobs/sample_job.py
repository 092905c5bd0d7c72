"""Sample jobs: which images of a pool to annotate next. The detector runs over the pool as in a
pre-labeling job (same items, batches, progress, cancel and resume), and each image's SAM embedding (through
the cache) is stored with its detections. When every image is done, server.services.sampling picks the
budget: the most uncertain images first, then k-center greedy among them for diversity."""

from __future__ import annotations

import json

import numpy as np

from server.errors import ApiError
from server.formats.ranking import Pick, embedding_of, write_ranking
from server.formats.stored import shape_from_dict
from server.jobs.control import JobFailed
from server.jobs.outputs import output_directory
from server.jobs.spec import JobSpec
from server.jobs.store import JobStore
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


def write_sample(store: JobStore, job_id: str, spec: JobSpec, settings: Settings) -> None:
    sample, target = spec.sample, spec.output.directory
    assert sample is not None and target is not None
    indices, names, confidences, vectors, failed = [], [], [], [], 0
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
        "embeddings": sample.embeddings,
        "pool": len(vectors),
        "failed": failed,
        "budget": sample.budget,
        "picked": len(picks),
        "uncertainty": sample.uncertainty,
        "prefilter": sample.prefilter,
        "seed": sample.seed,
    }
    with output_directory(target, job_id, settings, "ranking") as directory:
        write_ranking(directory, picks, summary)
