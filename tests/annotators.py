"""Simulated annotators against a running labelserve: each embeds its own image, then clicks on it with think
time, as people correcting masks do. Used by the reliability tests and bench/bench_load.py."""

from __future__ import annotations

import asyncio
import base64
import random
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
import psutil

from .conftest import encode_image, synthetic_scene


@dataclass
class LoadReport:
    clients: int
    seconds: float
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # "status code" or exception name → count
    busy: int = 0  # 503 with Retry-After: refused by backpressure, retried by the client
    click_ms: list[float] = field(default_factory=list)
    embed_ms: list[float] = field(default_factory=list)
    rss_mib: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, server RSS)

    def percentile(self, values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")

    def summary(self) -> dict:
        clicks, embeds = self.click_ms, self.embed_ms
        return {
            "clients": self.clients, "seconds": self.seconds, "requests": self.requests,
            "errors": self.errors, "busy_503": self.busy,
            "click_p50_ms": self.percentile(clicks, 50), "click_p95_ms": self.percentile(clicks, 95),
            "embed_p50_ms": self.percentile(embeds, 50), "embed_p95_ms": self.percentile(embeds, 95),
            "rss_mib": self.rss_mib,
        }  # fmt: skip


async def _annotator(
    http: httpx.AsyncClient,
    model: str,
    index: int,
    until: float,
    think_s: float,
    stagger_s: float,
    report: LoadReport,
) -> None:
    rng = random.Random(index)
    width, height = 640, 480
    image = base64.b64encode(encode_image(synthetic_scene(width, height, seed=index))).decode()
    image_id = None
    await asyncio.sleep(index * stagger_s)  # people do not all open their image at the same instant
    while time.monotonic() < until:
        if image_id is None:
            path, body, sink = f"/v1/sam/{model}/embed", {"image": {"base64": image}}, report.embed_ms
        else:
            clicks = [[rng.uniform(0, width), rng.uniform(0, height)] for _ in range(rng.randint(1, 4))]
            path, body, sink = (
                f"/v1/sam/{model}/segment",
                {"image_id": image_id, "points": clicks},
                report.click_ms,
            )
        start = time.perf_counter()
        try:
            response = await http.post(path, json=body)
        except httpx.HTTPError as exc:
            report.errors[type(exc).__name__] = report.errors.get(type(exc).__name__, 0) + 1
            continue
        report.requests += 1
        if response.status_code == 503 and "retry-after" in response.headers:
            report.busy += 1
            await asyncio.sleep(min(float(response.headers["retry-after"]), 2.0))
            continue
        if response.status_code != 200:
            key = str(response.status_code)
            report.errors[key] = report.errors.get(key, 0) + 1
            if response.status_code == 404:  # evicted: embed again
                image_id = None
            continue
        sink.append((time.perf_counter() - start) * 1000)
        if image_id is None:
            image_id = response.json()["image_id"]
        await asyncio.sleep(rng.uniform(0.5, 1.5) * think_s)


async def _sample_rss(pid: int, started: float, until: float, report: LoadReport) -> None:
    process = psutil.Process(pid)
    while time.monotonic() < until:
        report.rss_mib.append((round(time.monotonic() - started, 1), process.memory_info().rss // 2**20))
        await asyncio.sleep(2.0)


async def run_annotators(
    url: str,
    pid: int,
    clients: int = 16,
    seconds: float = 60,
    think_s: float = 1.0,
    stagger_s: float = 1.0,
    model: str = "mobile_sam",
) -> LoadReport:
    report = LoadReport(clients, seconds)
    started = time.monotonic()
    until = started + seconds
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        await asyncio.gather(
            _sample_rss(pid, started, until, report),
            *(_annotator(http, model, i, until, think_s, stagger_s, report) for i in range(clients)),
        )
    return report
