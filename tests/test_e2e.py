"""labelserve as users run it: `labelserve serve` in its own process, called over HTTP on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import encode_image, synthetic_scene


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "LABELSERVE_WEIGHTS_DIR": str(tmp_path_factory.mktemp("w")),
        "LABELSERVE_MODELS": "mobile_sam",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--random-init"],
        env=env,
        cwd=Path(__file__).parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            time.sleep(0.3)
        else:
            pytest.fail("server did not become ready in 90 s")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_embed_then_clicks_over_http(server: str) -> None:
    image = encode_image(synthetic_scene(800, 600, seed=5), "JPEG", quality=90)
    with httpx.Client(base_url=server, timeout=60) as http:
        embedded = http.post("/v1/sam/mobile_sam/embed", files={"file": ("a.jpg", image, "image/jpeg")})
        assert embedded.status_code == 200 and embedded.json()["cached"] is False
        image_id = embedded.json()["image_id"]
        for i in range(5):
            click = http.post(
                "/v1/sam/mobile_sam/segment", json={"image_id": image_id, "points": [[100 + 50 * i, 300]]}
            )
            assert click.status_code == 200
            assert click.json()["cached"] is True and "encode" not in click.headers["server-timing"]
        bad = http.post("/v1/sam/mobile_sam/segment", json={"image_id": image_id, "points": [[9000, 1]]})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "prompt_outside_image"
        assert http.get("/healthz").status_code == 200
        assert http.get("/docs").status_code == 200
