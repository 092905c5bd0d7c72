"""GPU memory gauges, read from torch at scrape time. Only torch and prometheus-client here, so the GPU test
runs on a machine with nothing else installed."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from prometheus_client.core import GaugeMetricFamily, Metric


def gpu_memory_metrics() -> Iterator[Metric]:
    """This process's tensors and allocator cache on the current CUDA device, and the device's free and total
    memory (all processes); nothing without CUDA."""
    if not torch.cuda.is_available():
        return
    device = str(torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info()
    for name, doc, value in (
        ("allocated", "Bytes held by tensors (torch.cuda.memory_allocated).", torch.cuda.memory_allocated()),
        (
            "reserved",
            "Bytes held by torch's caching allocator (memory_reserved).",
            torch.cuda.memory_reserved(),
        ),
        ("free", "Free bytes on the device, all processes included (cudaMemGetInfo).", free),
        ("total", "The device's memory.", total),
    ):
        family = GaugeMetricFamily(f"labelserve_gpu_memory_{name}_bytes", doc, labels=["device"])
        family.add_metric([device], value)
        yield family
