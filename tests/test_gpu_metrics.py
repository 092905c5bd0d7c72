"""GPU memory gauges on a CUDA host (skipped elsewhere). Imports only torch, prometheus-client and
server.ops.gpu_metrics, so it runs on a GPU machine without labelserve's other dependencies
(`pytest --noconftest tests/test_gpu_metrics.py`)."""

from __future__ import annotations

import pytest
import torch

from server.ops.gpu_metrics import gpu_memory_metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def gauges() -> dict[str, float]:
    return {sample.name: sample.value for family in gpu_memory_metrics() for sample in family.samples}


def test_gpu_memory_gauges_follow_allocations() -> None:
    before = gauges()
    block = torch.empty(256 * 1024**2, dtype=torch.uint8, device="cuda")
    during = gauges()
    assert during["labelserve_gpu_memory_allocated_bytes"] >= before[
        "labelserve_gpu_memory_allocated_bytes"
    ] + (block.numel())
    assert during["labelserve_gpu_memory_reserved_bytes"] >= during["labelserve_gpu_memory_allocated_bytes"]
    assert 0 < during["labelserve_gpu_memory_free_bytes"] < during["labelserve_gpu_memory_total_bytes"]
    del block
    torch.cuda.empty_cache()
    assert gauges()["labelserve_gpu_memory_reserved_bytes"] < during["labelserve_gpu_memory_reserved_bytes"]
