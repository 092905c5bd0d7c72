"""Simulated annotators against a running labelserve: each embeds its own image, then clicks on it with think
time, as people correcting masks do. Used by the reliability tests."""

from __future__ import annotations

import asyncio
import base64
import random
import time
from collections.abc import Awaitable, Callable
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
    rss_mib: list[tuple[float, int]] = field(default_factory=list)  # (s into the clicking minute, server RSS)
    warmup_s: float = 0.0  # until every annotator had its image embedded
    opened: int = 0  # annotators whose image was embedded in the warm-up
    pauses: list = field(default_factory=list)  # what `between` returned after each phase, nothing in flight

    def percentile(self, values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")

    def summary(self) -> dict:
        clicks, embeds = self.click_ms, self.embed_ms
        return {
            "clients": self.clients, "seconds": self.seconds, "requests": self.requests,
            "warmup_s": round(self.warmup_s, 1), "opened": self.opened,
            "errors": self.errors, "busy_503": self.busy,
            "click_p50_ms": self.percentile(clicks, 50), "click_p95_ms": self.percentile(clicks, 95),
            "embed_p50_ms": self.percentile(embeds, 50), "embed_p95_ms": self.percentile(embeds, 95),
            "rss_mib": self.rss_mib,
        }  # fmt: skip


async def _post(http: httpx.AsyncClient, path: str, body: dict, report: LoadReport) -> httpx.Response | None:
    """One request, counted; None when it failed or was refused with Retry-After (the caller tries again)."""
    try:
        response = await http.post(path, json=body)
    except httpx.HTTPError as exc:
        report.errors[type(exc).__name__] = report.errors.get(type(exc).__name__, 0) + 1
        return None
    report.requests += 1
    if response.status_code == 503 and "retry-after" in response.headers:
        report.busy += 1
        await asyncio.sleep(min(float(response.headers["retry-after"]), 2.0))
        return None
    if response.status_code != 200:
        key = str(response.status_code)
        report.errors[key] = report.errors.get(key, 0) + 1
    return response


class _Annotator:
    """One person: opens an image (embed), then corrects its mask with clicks and think time."""

    def __init__(self, http: httpx.AsyncClient, model: str, index: int, report: LoadReport) -> None:
        self.http, self.model, self.report = http, model, report
        self.rng = random.Random(index)
        self.width, self.height = 640, 480
        scene = synthetic_scene(self.width, self.height, seed=index)
        self.image = base64.b64encode(encode_image(scene)).decode()
        self.image_id: str | None = None

    async def open_image(self, deadline: float) -> None:
        while self.image_id is None and time.monotonic() < deadline:
            start = time.perf_counter()
            body = {"image": {"base64": self.image}}
            response = await _post(self.http, f"/v1/sam/{self.model}/embed", body, self.report)
            if response is not None and response.status_code == 200:
                self.report.embed_ms.append((time.perf_counter() - start) * 1000)
                self.image_id = response.json()["image_id"]

    async def click_until(self, until: float, think_s: float) -> None:
        await asyncio.sleep(self.rng.uniform(0, 1) * think_s)  # people do not all click at the same instant
        while time.monotonic() < until:
            if self.image_id is None:  # evicted: open it again, as the CVAT plugin does
                await self.open_image(until)
                continue
            points = [
                [self.rng.uniform(0, self.width), self.rng.uniform(0, self.height)]
                for _ in range(self.rng.randint(1, 4))
            ]
            start = time.perf_counter()
            body = {"image_id": self.image_id, "points": points}
            response = await _post(self.http, f"/v1/sam/{self.model}/segment", body, self.report)
            if response is None or response.status_code != 200:
                if response is not None and response.status_code == 404:
                    self.image_id = None
                continue
            self.report.click_ms.append((time.perf_counter() - start) * 1000)
            await asyncio.sleep(self.rng.uniform(0.5, 1.5) * think_s)


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
    warmup_limit_s: float = 600,
    phases: int = 1,
    between: Callable[[httpx.AsyncClient], Awaitable[object]] | None = None,
) -> LoadReport:
    """Warm-up first (every annotator opens its image, starts staggered), then `seconds` of clicking, during
    which the server's RSS is sampled: on a slow host the first encodes alone can take most of a minute, and
    memory can only be flat once every embedding is in the cache. The clicking is split into `phases`; after
    each, with no request in flight, `between` is awaited and what it returns kept in `report.pauses`."""
    report = LoadReport(clients, seconds)
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        people = [_Annotator(http, model, i, report) for i in range(clients)]
        warmup_started = time.monotonic()
        deadline = warmup_started + warmup_limit_s

        async def open_later(person: _Annotator, delay: float) -> None:
            await asyncio.sleep(delay)  # people do not all open their image at the same instant
            await person.open_image(deadline)

        await asyncio.gather(*(open_later(p, i * stagger_s) for i, p in enumerate(people)))
        report.warmup_s = time.monotonic() - warmup_started
        report.opened = sum(p.image_id is not None for p in people)
        started = time.monotonic()
        for _ in range(phases):
            until = time.monotonic() + seconds / phases
            await asyncio.gather(
                _sample_rss(pid, started, until, report), *(p.click_until(until, think_s) for p in people)
            )
            if between is not None:
                report.pauses.append(await between(http))
    return report
