"""Prometheus metrics at GET /metrics. Request counts and latencies (whole requests, and the Server-Timing
stages inside them) are recorded as each request ends (server/ops/metrics.py); everything else is read from
the services at scrape time, by LiveCollector here, so no other module updates a metric."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import get_args

from fastapi import APIRouter, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from models.registry import State
from server.api.deps import MetricsDep, Services
from server.jobs.store import JobState, JobStore
from server.ops import allocator
from server.ops.gpu_metrics import gpu_memory_metrics

log = logging.getLogger("labelserve.metrics")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

router = APIRouter(tags=["system"])


@router.get("/metrics", response_class=Response)
def scrape(metrics: MetricsDep) -> Response:
    """Prometheus text exposition (collectors query the job database: a thread, not the event loop)."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


class LiveCollector(Collector):
    """Caches, queues, jobs, models, tracking states and GPU memory, read when Prometheus scrapes."""

    def __init__(self, services: Services, jobs: JobStore) -> None:
        self.services = services
        self.jobs = jobs

    def collect(self) -> Iterator[Metric]:
        svc = self.services
        sections: list[Callable[[], Iterable[Metric]]] = [
            lambda: cache_metrics(svc.sam.stats()),
            lambda: batcher_metrics(svc),
            lambda: job_metrics(self.jobs),
            lambda: model_metrics(svc),
            lambda: track_metrics(svc.track.stats()),
            lambda: gpu_metrics(svc),
            lambda: backpressure_metrics(svc),
            allocator_metrics,
        ]
        for section in sections:
            try:
                yield from list(section())
            except Exception:  # one broken source must not cost the whole scrape
                log.exception("a metrics collector failed; its metrics are left out of this scrape")


_CACHE_COUNTERS = {
    "hits": "Lookups a cache tier answered.",
    "misses": "Lookups a cache tier could not answer.",
    "evictions": "Entries a cache tier dropped to stay within its byte cap.",
}
_CACHE_GAUGES = {
    "entries": "Entries held by a cache tier.",
    "bytes": "Bytes held by a cache tier.",
    "max_bytes": "Byte cap of a cache tier.",
    "inflight": "Encodes running whose result the tier will hold.",
}


def cache_metrics(stats: dict) -> Iterator[Metric]:
    """Every tier that `SamService.stats()` reports (embeddings, refinement, and any later tier): its integer
    fields become hits/misses/evictions counters, size gauges, or `labelserve_cache_events_total{event}`."""
    counters = {
        field: CounterMetricFamily(f"labelserve_cache_{field}", doc, labels=["tier"])
        for field, doc in _CACHE_COUNTERS.items()
    }
    gauges = {
        field: GaugeMetricFamily(f"labelserve_cache_{field}", doc, labels=["tier"])
        for field, doc in _CACHE_GAUGES.items()
    }
    events = CounterMetricFamily(
        "labelserve_cache_events",
        "Other counters of a cache tier (inflight_waits, uncacheable, reused, ...).",
        labels=["tier", "event"],
    )
    encoder_queue = GaugeMetricFamily(
        "labelserve_encode_queue_depth",
        "Image encodes waiting, by model and priority.",
        labels=["model", "priority"],
    )
    for tier, values in stats.items():
        if tier == "encoders" and isinstance(values, dict):
            for model, snapshot in values.items():
                for priority, waiting in (snapshot.get("queued") or {}).items():
                    encoder_queue.add_metric([model, priority], waiting)
            continue
        if not isinstance(values, dict):
            continue  # a tier that is not configured (null)
        for field, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int):
                continue  # names, states, averages
            if field in counters:
                counters[field].add_metric([tier], value)
            elif field in gauges:
                gauges[field].add_metric([tier], value)
            else:
                events.add_metric([tier, field], value)
    yield from (*counters.values(), *gauges.values(), events, encoder_queue)


def batcher_metrics(svc: Services) -> Iterator[Metric]:
    sizes = HistogramMetricFamily(
        "labelserve_detect_batch_size", "Images per detector forward pass (micro-batching).", labels=["model"]
    )
    depth = GaugeMetricFamily(
        "labelserve_detect_queue_depth", "Detection requests waiting for a forward pass.", labels=["model"]
    )
    for model, batcher in svc.detect.batchers().items():
        waiting, stats = batcher.snapshot()
        buckets = [
            (str(float(bound)), sum(n for size, n in stats.sizes.items() if size <= bound))
            for bound in BATCH_BUCKETS
        ]
        sizes.add_metric([model], [*buckets, ("+Inf", stats.batches)], sum_value=stats.items)
        depth.add_metric([model], waiting)
    yield from (sizes, depth)


def backpressure_metrics(svc: Services) -> Iterator[Metric]:
    snapshot = svc.inflight.snapshot()
    inflight = GaugeMetricFamily("labelserve_inflight_requests", "Requests in progress.", labels=["kind"])
    limits = GaugeMetricFamily(
        "labelserve_inflight_limit", "Most requests in progress at once.", labels=["kind"]
    )
    refused = CounterMetricFamily(
        "labelserve_refused_busy", "Requests answered 503 (Retry-After) at capacity.", labels=["where"]
    )
    for kind, count in snapshot["inflight"].items():
        inflight.add_metric([kind], count)
        limits.add_metric([kind], snapshot["limits"][kind])
        refused.add_metric([kind], snapshot["refused"][kind])
    for model, batcher in svc.detect.batchers().items():
        refused.add_metric([f"detect:{model}"], batcher.refused)
    superseded = CounterMetricFamily(
        "labelserve_clicks_superseded", "Clicks dropped because a newer one on the same image arrived first."
    )
    superseded.add_metric([], svc.latest_wins.superseded)
    yield from (inflight, limits, refused, superseded)


def job_metrics(store: JobStore) -> Iterator[Metric]:
    counts = store.state_counts()
    jobs = GaugeMetricFamily("labelserve_jobs", "Pre-labeling jobs, by state.", labels=["state"])
    for state in get_args(JobState):
        jobs.add_metric([state], counts.get(state, 0))
    images = GaugeMetricFamily(
        "labelserve_job_images",
        "Images of each queued or running job, by status (done, failed, pending).",
        labels=["job", "status"],
    )
    for job_id, _, total, done, failed in store.active_progress():
        for status, count in (("done", done), ("failed", failed), ("pending", total - done - failed)):
            images.add_metric([job_id, status], count)
    yield from (jobs, images)


def model_metrics(svc: Services) -> Iterator[Metric]:
    state = GaugeMetricFamily(
        "labelserve_model_state",
        "1 for each model's current load state, 0 for the others.",
        labels=["model", "kind", "state"],
    )
    load = GaugeMetricFamily("labelserve_model_load_seconds", "How long loading took.", labels=["model"])
    for record in svc.registry.describe():
        for name in get_args(State):
            state.add_metric([record["name"], record["kind"], name], 1.0 if record["state"] == name else 0.0)
        if record["load_seconds"] is not None:
            load.add_metric([record["name"]], record["load_seconds"])
    yield from (state, load)


def track_metrics(stats: dict[str, int]) -> Iterator[Metric]:
    yield GaugeMetricFamily("labelserve_track_states", "Tracking states held.", value=stats["states"])
    yield GaugeMetricFamily(
        "labelserve_track_state_bytes", "Bytes of the tracking states held.", value=stats["bytes"]
    )
    yield CounterMetricFamily(
        "labelserve_track_states_expired", "States dropped unused.", value=stats["expired"]
    )
    yield CounterMetricFamily(
        "labelserve_track_states_evicted", "States dropped at the byte cap.", value=stats["evicted"]
    )


def allocator_metrics() -> Iterator[Metric]:
    """The C allocator's live bytes and the bytes it holds (live + freed pages kept for reuse): a leak grows
    the first, the retention docs/operations.md describes only the second."""
    name = allocator.loaded() or "glibc"
    usage = allocator.usage(name)
    if usage is None:
        return
    for key, doc in (
        ("allocated", "Bytes in live allocations of the C allocator (torch's CPU tensors included)."),
        ("resident", "Bytes the C allocator holds in memory: live, freed and kept for reuse, metadata."),
    ):
        family = GaugeMetricFamily(f"labelserve_allocator_{key}_bytes", doc, labels=["allocator"])
        family.add_metric([name], usage[key])
        yield family


def gpu_metrics(svc: Services) -> Iterator[Metric]:
    if svc.registry.device.type == "cuda":
        yield from gpu_memory_metrics()
