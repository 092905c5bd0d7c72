"""Review and sample jobs as users run them: a `labelserve serve` process with the real person detector and
MobileSAM (seeded random weights). The detector's own confident boxes are the labels; a few are then shifted,
and spurious boxes are added on the background. The review ranks those first; a review (and a sample job)
right after a pre-labeling job with the same SAM model encodes no image again (the embedding cache)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import fall_checkpoint, ultralytics_asset
from .server_process import ServerProcess

IMAGES = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("review-server")
    env = {
        "LABELSERVE_DATA_DIR": str(tmp / "data"),
        "LABELSERVE_WEIGHTS_DIR": str(tmp / "weights"),
        "LABELSERVE_MODELS": "mobile_sam",
        "LABELSERVE_DETECTOR_PATHS": json.dumps({"fall": str(fall_checkpoint())}),
    }
    with ServerProcess(env, tmp / "server.log", random_init=True) as process:
        yield process


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("photos")
    bus = Image.open(ultralytics_asset("bus.jpg")).convert("RGB")
    for i in range(IMAGES):
        w, h = bus.size
        crop = bus.crop((i * 9, i * 7, w - i * 5, h - i * 11)).resize((480 + 8 * i, 640 + 10 * i))
        crop.save(directory / f"bus_{i}.jpg", quality=92)
    return directory


def run(server: ServerProcess, spec: dict) -> dict:
    reply = server.http.post("/v1/jobs", json=spec)
    assert reply.status_code == 201, reply.text
    job_id = reply.json()["id"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = server.http.get(f"/v1/jobs/{job_id}").json()
        if status["state"] not in ("queued", "running"):
            assert status["state"] == "completed", status
            return status
        time.sleep(0.2)
    raise TimeoutError(status)


def encodes(server: ServerProcess) -> int:
    """Images MobileSAM has encoded so far, at any priority."""
    done = server.http.get("/v1/cache/stats").json()["encoders"].get("mobile_sam", {}).get("done", {})
    return sum(done.values())


def test_review_with_the_real_detector_after_prelabeling(
    server: ServerProcess, photos: Path, tmp_path: Path
) -> None:
    # The labels: the detector's own confident boxes (conf >= 0.5), as a COCO file.
    run(server, {"source": {"directory": str(photos)}, "detector": "fall", "params": {"conf": 0.5},
                 "output": {"format": "coco", "directory": str(tmp_path / "labels")}})  # fmt: skip
    coco = json.loads((tmp_path / "labels" / "annotations.json").read_text())
    assert len(coco["annotations"]) >= IMAGES
    # Pre-label with SAM as well: this encodes every image once into the cache.
    run(server, {"source": {"directory": str(photos)}, "detector": "fall", "sam_refine": "mobile_sam",
                 "output": {"format": "coco", "directory": str(tmp_path / "masks")}})  # fmt: skip
    encoded = encodes(server)
    assert encoded == IMAGES

    rng = np.random.default_rng(0)
    shifted, spurious = set(), set()
    sizes = {image["id"]: (image["width"], image["height"]) for image in coco["images"]}
    people = [a for a in coco["annotations"] if a["bbox"][2] * a["bbox"][3] > 2000]
    for a in rng.choice(people, size=3, replace=False):
        x, y, w, h = a["bbox"]
        a["bbox"] = [x + 0.5 * w, y + 0.3 * h, w, h]
        shifted.add(a["id"])
    for image_id in (1, 4, 7):
        width, height = sizes[image_id]
        ann_id = max(a["id"] for a in coco["annotations"]) + 1
        # A box over the sky at the top-left corner, where the photos show no one.
        box = [2, 2, 0.12 * width, 0.05 * height]
        category = people[0]["category_id"]
        coco["annotations"].append({"id": ann_id, "image_id": image_id, "category_id": category, "bbox": box,
                                    "iscrowd": 0, "area": 1, "segmentation": []})  # fmt: skip
        spurious.add(ann_id)
    for a in coco["annotations"][:4]:  # four as polygons: the SAM check prompts with their boxes
        x, y, w, h = a["bbox"]
        a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    corrupted = tmp_path / "corrupted.json"
    corrupted.write_text(json.dumps(coco))

    review = {"annotations": str(corrupted), "format": "coco", "sam": "mobile_sam"}
    output = {"format": "findings", "directory": str(tmp_path / "review")}
    status = run(server, {"source": {"directory": str(photos)}, "detector": "fall", "review": review,
                          "output": output})  # fmt: skip
    assert status["outputs"][0].endswith("findings.json")
    assert encodes(server) == encoded  # no image encoded again
    document = json.loads((tmp_path / "review" / "findings.json").read_text())
    listed = document["findings"]
    errors = len(shifted) + len(spurious)
    top = {int(d["shape_id"]) for d in listed[: 2 * errors] if d["shape_id"] is not None}
    head = [(d["kind"], d["shape_id"], round(d["score"], 3)) for d in listed[:8]]
    recall = len(top & (shifted | spurious)) / errors
    print(f"\nreal detector: {errors} injected, recall@2E {recall:.2f}; top findings {head}")
    assert spurious <= top
    assert len(top & shifted) >= 2
    assert sum(d["kind"] == "sloppy_edge" for d in listed) <= 4  # random SAM weights: only these can be


def test_a_sample_job_uses_the_cached_embeddings(server: ServerProcess, photos: Path, tmp_path: Path) -> None:
    """After the review above (or on its own), the pool's MobileSAM embeddings come from the cache."""
    run(server, {"source": {"directory": str(photos)}, "detector": "fall", "sam_refine": "mobile_sam",
                 "output": {"format": "coco", "directory": str(tmp_path / "warm")}})  # fmt: skip
    encoded = encodes(server)
    status = run(server, {"source": {"directory": str(photos)}, "detector": "fall",
                          "sample": {"budget": 3, "embeddings": "mobile_sam"},
                          "output": {"format": "ranking", "directory": str(tmp_path / "next")}})  # fmt: skip
    assert status["outputs"][0].endswith("ranking.json")
    assert encodes(server) == encoded  # no image encoded again
    ranking = json.loads((tmp_path / "next" / "ranking.json").read_text())
    assert ranking["summary"]["pool"] == IMAGES and len({r["image"] for r in ranking["images"]}) == 3
    spec = {"source": {"directory": str(photos)}, "detector": "fall",
            "sample": {"budget": 99, "embeddings": "mobile_sam"},
            "output": {"format": "ranking", "directory": str(tmp_path / "x")}}  # fmt: skip
    too_many = server.http.post("/v1/jobs", json=spec)
    assert (too_many.status_code, too_many.json()["error"]["code"]) == (400, "budget_too_large")
