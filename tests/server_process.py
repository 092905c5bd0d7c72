"""`labelserve serve` in its own process on a free loopback port, as users run it (tests and benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """Started on construction, ready (`/readyz` 200) when it returns. Its log goes to a file, never to an
    unread pipe, which would block the server once the access log filled the pipe's buffer."""

    def __init__(
        self, env: dict[str, str], log: Path, *, random_init: bool = False, timeout: float = 90
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port)]
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [*command, *(["--random-init"] if random_init else [])],
                env={**os.environ, **env}, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.http = httpx.Client(base_url=self.url, timeout=300)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"labelserve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"labelserve was not ready in {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:  # still finishing requests: do not leave it behind
                self.process.kill()
                self.process.wait(10)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
