"""`labelserve serve` runs under the allocator LABELSERVE_ALLOCATOR picks (server/ops/allocator.py): tcmalloc
by default when installed, re-executing itself with LD_PRELOAD before torch loads; glibc, tuned, otherwise."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.ops import allocator

from .server_process import ServerProcess

INSTALLED = {name: allocator.library_path(name) is not None for name in allocator.LIBRARIES}


def mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.parametrize(
    ("choice", "library"),
    [("auto", "jemalloc"), ("tcmalloc", "tcmalloc"), ("jemalloc", "jemalloc"), ("glibc", None)],
)
def test_serve_runs_under_the_chosen_allocator(tmp_path: Path, choice: str, library: str | None) -> None:
    if library is not None and not INSTALLED[library]:
        pytest.skip(f"lib{allocator.LIBRARIES[library]} is not installed (.ci/run installs it)")
    env = {"LABELSERVE_ALLOCATOR": choice, "LABELSERVE_MODELS": "[]", "LABELSERVE_DATA_DIR": str(tmp_path)}
    with ServerProcess(env, tmp_path / "server.log") as server:
        maps, log = mapped(server.process.pid), server.log.read_text()
        environ = Path(f"/proc/{server.process.pid}/environ").read_bytes().split(b"\0")
        assert server.http.get("/healthz").status_code == 200  # the re-executed process serves
    conf = f"MALLOC_CONF={allocator.JEMALLOC_CONF}".encode()
    assert (conf in environ) == (library == "jemalloc" and "MALLOC_CONF" not in os.environ)
    for name, path in allocator.LIBRARIES.items():
        assert (f"lib{path}" in maps) == (name == library), name
    assert f"allocator: {library or 'glibc (tuned)'}" in log


def test_auto_prefers_jemalloc_then_tcmalloc_then_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    present = {"tcmalloc": "libtcmalloc_minimal.so.4", "jemalloc": "libjemalloc.so.2"}
    monkeypatch.setattr(allocator, "library_path", lambda name: present.get(name))
    assert allocator.wanted("auto") == "jemalloc"
    del present["jemalloc"]
    assert allocator.wanted("auto") == "tcmalloc"
    del present["tcmalloc"]
    assert allocator.wanted("auto") is None
    assert allocator.wanted("glibc") is None and allocator.wanted("untuned") is None


def test_a_missing_library_falls_back_to_glibc_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(allocator, "library_path", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="labelserve"):
        assert allocator.wanted("jemalloc") is None
    assert "libjemalloc is not installed" in caplog.text


def test_preload_never_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that was re-executed once is not re-executed again, even if the preload did not load."""
    monkeypatch.setattr(allocator, "library_path", lambda name: "libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator, "loaded", lambda: None)
    monkeypatch.setenv(allocator.REEXEC_MARK, "tcmalloc")
    monkeypatch.setattr(allocator.os, "execve", lambda *a: pytest.fail("re-executed twice"))
    allocator.preload("auto", ["serve"])


def test_trimming_calls_the_allocators_release_on_its_own_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    assert allocator.start_trimming("glibc", 0) is None  # off by default
    calls: list[float] = []
    monkeypatch.setattr(allocator, "release_function", lambda name: lambda: calls.append(time.monotonic()))
    thread = allocator.start_trimming("glibc", 0.02)
    assert thread is not None and thread.name == "memory-trim" and thread.daemon
    deadline = time.monotonic() + 10
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls) >= 3


@pytest.mark.parametrize("name", [*allocator.LIBRARIES, "glibc"])
def test_the_release_function_runs_under_each_allocator(name: str) -> None:
    if name != "glibc" and not INSTALLED[name]:
        pytest.skip(f"lib{allocator.LIBRARIES[name]} is not installed (.ci/run installs it)")
    preload = {"LD_PRELOAD": allocator.library_path(name)} if name != "glibc" else {}
    script = (
        "from server.ops import allocator as a; name = a.loaded() or 'glibc'; "
        f"assert name == {name!r}, name; a.release_function(name)()"
    )
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **preload}, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", [*allocator.LIBRARIES, "glibc"])
def test_usage_counts_live_bytes_and_what_the_allocator_keeps(name: str) -> None:
    """64 MiB allocated and touched shows in both figures; freed, it leaves the live bytes, and under jemalloc
    (decay off, as `labelserve serve` configures it) stays resident for reuse."""
    if name != "glibc" and not INSTALLED[name]:
        pytest.skip(f"lib{allocator.LIBRARIES[name]} is not installed (.ci/run installs it)")
    env = {**os.environ, "MALLOC_CONF": allocator.JEMALLOC_CONF}
    if name != "glibc":
        env["LD_PRELOAD"] = allocator.library_path(name)
    script = (
        "import json, numpy as np; from server.ops import allocator as a; name = a.loaded() or 'glibc'\n"
        f"assert name == {name!r}, name\n"
        "before = a.usage(name); block = np.ones(64 << 20, np.uint8); held = a.usage(name); del block\n"
        "print(json.dumps([before, held, a.usage(name)]))"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    before, held, after = (
        {key: value / 2**20 for key, value in usage.items()} for usage in json.loads(done.stdout)
    )
    assert 63 <= held["allocated"] - before["allocated"] <= 66
    assert 63 <= held["resident"] - before["resident"] <= 80
    assert abs(after["allocated"] - before["allocated"]) <= 1
    if name == "jemalloc":
        assert after["resident"] >= held["resident"] - 1
