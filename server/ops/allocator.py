"""The process's C allocator: chosen before torch allocates anything, because it sets what each click costs.

torch's CPU tensors come from malloc. glibc hands blocks above its mmap threshold straight to mmap and
unmaps them on free, so every activation buffer of a SAM encode or decode is page-faulted in again on each
call. Measured with MobileSAM on 2 cores (bench/bench_memory.py, docs: benchmarks), jemalloc configured
never to return freed pages on its own (dirty and muzzy decay off) runs `set_image` in 0.9-1.0 s against
1.6-1.9 s under glibc's defaults, and keeps RSS flat: after 500 distinct images it stood 88-93 MiB above the
first image with a 64 MiB cache, 298 MiB with a 256 MiB one. tcmalloc is as fast but grew by 151 MiB in 120
images with the 64 MiB cache, over what the cache explains.

`labelserve serve` calls `preload()` first thing: when the chosen library is not in this process yet, it
re-executes itself with LD_PRELOAD set (a malloc cannot be swapped once the process runs), and for jemalloc
with MALLOC_CONF set to JEMALLOC_CONF unless the operator set it. The Docker image sets nothing itself: its
entrypoint becomes `labelserve serve`, which does the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

log = logging.getLogger("labelserve")

Allocator = Literal["auto", "tcmalloc", "jemalloc", "glibc", "untuned"]

# Debian/Ubuntu packages: libtcmalloc-minimal4, libjemalloc2. ldconfig's cache finds them on any architecture.
LIBRARIES = {"tcmalloc": "tcmalloc_minimal", "jemalloc": "jemalloc"}
AUTO_ORDER = ("jemalloc", "tcmalloc")
# Freed pages stay with jemalloc for the next encode instead of being returned and faulted in again; RSS stays
# bounded by the largest working set (LABELSERVE_MEMORY_TRIM_S returns them periodically, at a cost). Two
# arenas: each keeps its own freed pages, and jemalloc's default is four per core.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1,narenas:2"
REEXEC_MARK = "LABELSERVE_ALLOCATOR_REEXEC"  # set on the re-executed process: never loop

# glibc, when neither library is installed: keep blocks up to 32 MiB (glibc's ceiling on 64-bit) in the heap
# and the heap's top mapped, so buffers are reused instead of faulted in again.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLCTL_ARENAS_ALL = 4096  # jemalloc's MALLCTL_ARENAS_ALL: "arena.4096.purge" purges every arena
GLIBC_MMAP_THRESHOLD = 32 << 20
GLIBC_TRIM_THRESHOLD = 512 << 20


def loaded() -> str | None:
    """The allocator library mapped into this process, if any of ours."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for name, library in LIBRARIES.items():
        if f"lib{library}" in maps:
            return name
    return None


def library_path(name: str) -> str | None:
    """The shared library's soname as the dynamic loader finds it, or None when it is not installed."""
    return ctypes.util.find_library(LIBRARIES[name])


def wanted(choice: Allocator) -> str | None:
    """The library to preload for a choice; None means glibc (chosen, or nothing else installed)."""
    if choice in ("glibc", "untuned"):
        return None
    for name in AUTO_ORDER if choice == "auto" else (choice,):
        if library_path(name):
            return name
    if choice != "auto":
        log.warning("LABELSERVE_ALLOCATOR=%s, but lib%s is not installed: glibc instead", choice,
                    LIBRARIES[choice])  # fmt: skip
    return None


def preload(choice: Allocator, argv: Sequence[str]) -> None:
    """Re-execute this command with the wanted allocator preloaded, unless it is loaded already. Returns
    when nothing needs doing (or it cannot be done: then glibc is tuned instead, in `apply`)."""
    name = wanted(choice)
    if name is None or loaded() == name or os.environ.get(REEXEC_MARK):
        return
    env = dict(os.environ)
    env[REEXEC_MARK] = name
    env["LD_PRELOAD"] = " ".join(filter(None, [library_path(name), env.get("LD_PRELOAD", "")]))
    if name == "jemalloc":
        env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "server.cli", *argv], env)


def apply(choice: Allocator) -> str:
    """Called once the server starts: tunes glibc when it is the allocator. Returns the allocator in use."""
    name = loaded()
    if name is not None:
        return name
    if os.environ.get(REEXEC_MARK):
        log.warning("the %s preload did not take effect: glibc instead", os.environ[REEXEC_MARK])
    if choice == "untuned":
        return "glibc (untuned)"
    return "glibc (tuned)" if tune_glibc() else "glibc (untuned: mallopt unavailable)"


def tune_glibc() -> bool:
    """True when applied (glibc only; other C libraries keep their own policy)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(
            libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD)
            and libc.mallopt(M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD)
        )
    except (OSError, AttributeError):
        log.debug("mallopt unavailable; allocator left as is")
        return False


def release_function(name: str) -> Callable[[], None] | None:
    """What returns the allocator's free memory to the system: glibc's malloc_trim(0), jemalloc's purge of
    every arena, tcmalloc's ReleaseFreeMemory. Looked up among the process's own symbols, where a preloaded
    library put them; None where the symbol is missing."""
    try:
        process = ctypes.CDLL(None)
        if name == "tcmalloc":
            return process.MallocExtension_ReleaseFreeMemory
        if name == "jemalloc":
            mallctl, purge = process.mallctl, f"arena.{MALLCTL_ARENAS_ALL}.purge".encode()
            return lambda: mallctl(purge, None, None, None, 0)
        trim = process.malloc_trim
        return lambda: trim(0)
    except (OSError, AttributeError):
        return None


_MALLINFO2_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")  # fmt: skip


class _MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (glibc 2.33+): ten size_t fields, in this order."""

    _fields_ = [(field, ctypes.c_size_t) for field in _MALLINFO2_FIELDS]


def usage(name: str) -> dict[str, int] | None:
    """Bytes in live allocations ("allocated") and bytes the allocator holds in memory ("resident": live
    plus the freed pages it keeps for reuse, plus its metadata). RSS minus resident is what malloc does not
    own (Python's small-object arenas, code, mapped files). A leak grows "allocated"; the retention this
    module chooses grows only "resident". None where the allocator's statistics are unavailable."""
    try:
        process = ctypes.CDLL(None)
        if name == "jemalloc":
            return _jemalloc_usage(process.mallctl)
        if name == "tcmalloc":
            get = process.MallocExtension_GetNumericProperty
            values = []
            for key in (
                b"generic.current_allocated_bytes",
                b"generic.heap_size",
                b"tcmalloc.pageheap_unmapped_bytes",
            ):
                value = ctypes.c_size_t()
                if not get(key, ctypes.byref(value)):
                    return None
                values.append(value.value)
            allocated, heap, unmapped = values
            return {"allocated": allocated, "resident": heap - unmapped}
        mallinfo2 = process.mallinfo2
        mallinfo2.restype = _MallInfo2
        info = mallinfo2()
        return {"allocated": info.uordblks + info.hblkhd, "resident": info.arena + info.hblkhd}
    except (OSError, AttributeError):
        return None


def _jemalloc_usage(mallctl: Callable[..., int]) -> dict[str, int] | None:
    # jemalloc's statistics are a snapshot taken when "epoch" is written.
    epoch = ctypes.c_uint64(1)
    if mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.c_size_t(ctypes.sizeof(epoch))):
        return None
    out = {}
    for key, stat in (("allocated", b"stats.allocated"), ("resident", b"stats.resident")):
        value, size = ctypes.c_size_t(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
        if mallctl(stat, ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)):
            return None
        out[key] = value.value
    return out


def start_trimming(name: str, period_s: float) -> threading.Thread | None:
    """Every `period_s`, return the allocator's free memory to the system, on a thread of its own. It bounds
    RSS more tightly, and the next encodes and clicks pay page faults for it (docs: operations)."""
    release = release_function(name) if period_s > 0 else None
    if release is None:
        return None
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(period_s):
            release()

    thread = threading.Thread(target=loop, name="memory-trim", daemon=True)
    thread.start()
    return thread
