"""Helpers the benchmark scripts share."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.server_process import ServerProcess  # noqa: E402

DRIFT = 0.15  # a figure further than this from the published one is reported
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")

# What a benchmark's own process may have set that a user's bare script would not have: ultralytics sets
# OMP_NUM_THREADS=1 on import, and the allocator candidates set preloads and malloc tunables.
_NOT_BARE = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES")


def timed_ms(fn: Callable[[], object], repeat: int) -> list[float]:
    """Wall time of each of `repeat` calls, in milliseconds."""
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def bare_env() -> dict[str, str]:
    """The environment of a user's shell: this process's, less what benchmarks and their imports set."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in _NOT_BARE and not k.startswith(("LABELSERVE_", "MALLOC_"))
    }


def bare_reference(image: Path, point: list[float], *, model: str = "mobile_sam", cold: int = 3,
                   clicks: int = 30) -> dict[str, list[float]]:  # fmt: skip
    """SamPredictor's set_image and predict wall times (ms) in a bare process (bench/bare_sam.py)."""
    command = [sys.executable, str(ROOT / "bench" / "bare_sam.py"), str(image), "--point", *map(str, point),
               "--model", model, "--cold", str(cold), "--clicks", str(clicks)]  # fmt: skip
    done = subprocess.run(command, env=bare_env(), capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


class BareReference:
    """bench/bare_sam.py --serve: a bare process holding the model and the image, timing what it is asked when
    it is asked. Benchmarks interleave its blocks with the server's (never at the same time), so both sides
    see the host in the same state: on a shared or virtual machine a run's speed drifts by 20 % over minutes,
    and one side measured a minute after the other inherits that drift."""

    def __init__(self, image: Path, point: list[float], model: str = "mobile_sam") -> None:
        script = str(ROOT / "bench" / "bare_sam.py")
        command = [
            sys.executable,
            script,
            str(image),
            "--point",
            *map(str, point),
            "--model",
            model,
            "--serve",
        ]
        self.process = subprocess.Popen(
            command, env=bare_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.threads = json.loads(self._line())["threads"]

    def _line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"bare_sam.py exited with {self.process.wait()}")
        return line

    def time(self, what: str, count: int) -> list[float]:
        """Wall ms of `count` runs of `what`: set_image, predict or floor."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"{what} {count}\n")
        self.process.stdin.flush()
        return json.loads(self._line())

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)

    def __enter__(self) -> BareReference:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SamServer(ServerProcess):
    """`labelserve serve --random-init` with one SAM model, its own weights and data directories."""

    def __init__(self, model: str = "mobile_sam", timeout: float = 180, **env: str) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="labelserve-bench-"))
        environ = {
            "LABELSERVE_WEIGHTS_DIR": str(tmp / "weights"),
            "LABELSERVE_DATA_DIR": str(tmp / "data"),
            "LABELSERVE_MODELS": model,
            **env,
        }
        super().__init__(environ, tmp / "server.log", random_init=True, timeout=timeout)

    def rss_mib(self) -> float:
        """Resident memory of the server (the re-executed process keeps the pid)."""
        with open(f"/proc/{self.process.pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def allocator(self) -> str:
        """The allocator the server reported at start (server/ops/allocator.py)."""
        for line in self.log.read_text(errors="replace").splitlines():
            if "allocator:" in line:
                return line.split("allocator:", 1)[1].strip().strip('"}')
        return "unknown"


def report(name: str, results: dict, tables: dict[str, str]) -> None:
    """Write bench/out/NAME.json, print the tables, and warn where one drifted from its published copy (the
    table after `<!-- MARKER -->` in the docs, MARKER being each key of `tables`)."""
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    print("\n\n".join(tables.values()))
    for marker, table in tables.items():
        for warning in compare_published(marker, table):
            print(f"WARNING: {warning}")


def published_table(marker: str) -> str | None:
    """The markdown table right after `<!-- MARKER -->` in the README or the docs, if one is there."""
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        tag = f"<!-- {marker} -->"
        if tag in text:
            table = []  # the table that starts right after the marker, and nothing below it
            for line in text.split(tag, 1)[1].lstrip("\n").splitlines():
                if not line.startswith("|"):
                    break
                table.append(line)
            return "\n".join(table) or None
    return None


def compare_published(marker: str, table: str) -> list[str]:
    """Where a freshly measured table differs from the published one by more than DRIFT: one message per
    figure, naming the row. Rows are matched by their first cell, figures by their order in the row."""
    published = published_table(marker)
    if published is None:
        return [f"no table published under <!-- {marker} --> (README.md or docs/)"]
    old = {row.split("|")[1].strip(): row for row in published.splitlines()[2:]}
    warnings = []
    for row in table.splitlines()[2:]:
        name = row.split("|")[1].strip()
        if name not in old:
            warnings.append(f"{marker}: row {name!r} is not published")
            continue
        new_numbers, old_numbers = _numbers(row), _numbers(old[name])
        for index, (new, was) in enumerate(zip(new_numbers, old_numbers, strict=False)):
            if was and abs(new - was) / abs(was) > DRIFT:
                warnings.append(f"{marker}: {name!r}, figure {index + 1}: {new:g} now, {was:g} published")
    return warnings


def _numbers(row: str) -> list[float]:
    cells = row.split("|")[2:]
    return [float(n.replace(",", "")) for cell in cells for n in _NUMBER.findall(cell)]
