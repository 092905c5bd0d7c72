"""Checkpoints in the official layout load through the manifest path; a corrupted one is refused."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from models.sam import build_sam
from server.app import create_app
from weights import store

from .conftest import make_settings


@pytest.fixture
def official_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict]:
    """A MobileSAM state dict saved as MobileSAM publishes it, with the manifest pointing at its hash."""
    torch.manual_seed(1234)
    state = build_sam("mobile_sam", None).state_dict()
    path = tmp_path / "weights" / "mobile_sam.pt"
    path.parent.mkdir()
    torch.save(state, path)
    data = path.read_bytes()
    real = store.load_manifest
    entry = dataclasses.replace(real()["mobile_sam"], size=len(data), sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(store, "load_manifest", lambda: {**real(), "mobile_sam": entry})
    return path, state


def test_checkpoint_loads_through_manifest(tmp_path: Path, official_checkpoint) -> None:
    _, state = official_checkpoint
    app = create_app(make_settings(tmp_path, random_init=False), load_models_in_background=False)
    with TestClient(app) as client:
        model = {m["name"]: m for m in client.get("/v1/models").json()["models"]}["mobile_sam"]
        assert model["state"] == "loaded" and model["weights"] == "checkpoint"
        loaded = app.state.services.registry.segmenter("mobile_sam").sam.state_dict()
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_corrupted_checkpoint_is_refused(tmp_path: Path, official_checkpoint) -> None:
    path, _ = official_checkpoint
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))
    app = create_app(make_settings(tmp_path, random_init=True), load_models_in_background=False)
    with TestClient(app) as client:
        model = {m["name"]: m for m in client.get("/v1/models").json()["models"]}["mobile_sam"]
        # Random init never silently replaces a checkpoint that is present but wrong.
        assert model["state"] == "unavailable" and model["weights"] is None
        assert "sha256" in model["message"]
        response = client.post(
            "/v1/sam/mobile_sam/embed", content=b"x", headers={"content-type": "image/png"}
        )
        assert response.status_code == 503 and "sha256" in response.json()["error"]["message"]
