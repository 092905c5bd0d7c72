"""Prometheus metrics recorded as each request ends: request counts and latencies (whole requests, and the
Server-Timing stages inside them), in a registry of the app's own. Everything else is read from the services
at scrape time by the collector server/api/metrics.py adds, so no other module updates a metric."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from server.ops.timing import Timings

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UNMATCHED = "<unmatched>"  # the route label of paths no route serves: raw paths would explode cardinality


class Metrics:
    """One per app (own registry), so several apps in one process, as in the tests, do not clash."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "labelserve_requests",
            "HTTP requests answered, by listener, route template, method and status class.",
            ["listener", "route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "labelserve_request_duration_seconds",
            "Time from a request's arrival to the end of its response.",
            ["listener", "route", "method"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.stages = Histogram(
            "labelserve_stage_duration_seconds",
            "Time spent in each stage of a request, as in its Server-Timing header (read, hash, "
            "decode_image, resize, encode, decode_mask, upsample, serialize, detect, ...); stages may nest "
            "(embedding holds decode_image, resize and encode).",
            ["route", "stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "labelserve_requests_in_flight", "Requests being served.", ["listener"], registry=self.registry
        )
        ProcessCollector(registry=self.registry)

    def observe(
        self, listener: str, route: str, method: str, status: int, seconds: float, timings: Iterable[Timings]
    ) -> None:
        self.requests.labels(listener, route, method, f"{status // 100}xx").inc()
        self.latency.labels(listener, route, method).observe(seconds)
        for timing in timings:
            for stage, ms in timing.stages.items():
                self.stages.labels(route, stage).observe(ms / 1000.0)

    def watch(self, collector: Collector) -> None:
        """Adds what is read at scrape time (server/api/metrics.py's LiveCollector)."""
        self.registry.register(collector)
