"""labelserve's SAM 3 concept instances equal transformers' own Sam3Model + Sam3Processor post-processing for
the same seeded random weights, image and prompts; and the image's vision features are computed once.

The server builds `sam3` with random weights (LABELSERVE_RANDOM_INIT, seed 0) for the small architecture of
its snapshot directory's config.json (models/sam3.py TINY_CONFIG: the full architecture's structure at a
224-pixel input); the reference is `Sam3Model(config)` built separately from the same seed, run whole
(`model(**processor(images=..., text=...))`) and post-processed by
`Sam3Processor.post_process_instance_segmentation`. Two servers: a float32 cache (scores and boxes equal to
float noise; a mask pixel may differ only where the reference's upsampled probability is within 1e-5 of the
mask threshold) and the default float16 cache (scores within 1e-3, mask IoU >= 0.99).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torchvision.ops import nms

from models.concept import MAX_EXEMPLARS, MAX_PHRASE_CHARS, MAX_PHRASES
from models.hf_snapshot import CheckpointMismatch
from models.sam3 import TINY_CONFIG, Sam3Concepts, load_sam3, random_sam3, sam3_config
from models.sam3_clicks import random_tracker
from server.app import create_app
from server.formats.rle import coco_rle_decode
from server.inputs.images import decode_image

from .conftest import encode_image, make_settings, ultralytics_asset

MODEL = "sam3"
PHRASES = ["bus", "person", "a red car"]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def tiny_snapshot(weights_dir: Path) -> Path:
    """weights/sam3 holding only the small architecture's config.json: random init builds that."""
    directory = weights_dir / MODEL
    sam3_config(TINY_CONFIG).save_pretrained(directory)
    return directory


def app_client(tmp: Path, **settings: object) -> Iterator[TestClient]:
    tiny_snapshot(tmp / "weights")
    values: dict = {"models": [MODEL, "mobile_sam"], **settings}
    app = create_app(make_settings(tmp, **values), load_models_in_background=False)
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def exact(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    yield from app_client(tmp_path_factory.mktemp("sam3-exact"), cache_dtype="float32")


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    yield from app_client(
        tmp_path_factory.mktemp("sam3-default"), cache_disk_dir=tmp_path_factory.mktemp("l2")
    )


@pytest.fixture(scope="module")
def reference() -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)  # the registry's LABELSERVE_RANDOM_SEED
    return random_sam3(TINY_CONFIG)


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return {name: ultralytics_asset(name).read_bytes() for name in ("bus.jpg", "zidane.jpg")}


def concepts_of(client: TestClient) -> Sam3Concepts:
    model = client.app.state.services.registry.concept(MODEL)
    assert isinstance(model, Sam3Concepts)
    return model


def post(client: TestClient, body: dict, model: str = MODEL) -> dict:
    response = client.post(f"/v1/concepts/{model}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def inline(data: bytes) -> dict:
    return {"base64": base64.b64encode(data).decode()}


def reference_instances(
    reference: tuple[torch.nn.Module, object],
    image: np.ndarray,
    phrase: str,
    score_threshold: float,
    mask_threshold: float,
    exemplars: tuple[list, list] | None = None,
) -> dict[str, np.ndarray]:
    """transformers' own pipeline, best score first; masks also at mask_threshold ± 1e-5."""
    model, processor = reference
    extra = {}
    if exemplars is not None:
        positive, negative = exemplars
        extra = {
            "input_boxes": [[list(map(float, b)) for b in [*positive, *negative]]],
            "input_boxes_labels": [[1] * len(positive) + [0] * len(negative)],
        }
    inputs = processor(images=image, text=phrase, return_tensors="pt", **extra)
    with torch.inference_mode():
        outputs = model(**inputs)
    sizes = inputs["original_sizes"].tolist()
    post = {
        t: processor.post_process_instance_segmentation(outputs, score_threshold, t, sizes)[0]
        for t in (mask_threshold, mask_threshold - 1e-5, mask_threshold + 1e-5)
    }
    found = post[mask_threshold]
    order = torch.sort(found["scores"], descending=True, stable=True).indices.numpy()
    height, width = image.shape[:2]
    return {
        "scores": found["scores"].numpy()[order],
        "boxes": np.clip(found["boxes"].numpy()[order], 0, [width, height, width, height]),
        "masks": found["masks"].numpy()[order].astype(bool),
        "masks_low": post[mask_threshold - 1e-5]["masks"].numpy()[order].astype(bool),
        "masks_high": post[mask_threshold + 1e-5]["masks"].numpy()[order].astype(bool),
    }


def own_pixels(data: bytes) -> bytes:
    """The image with one pixel changed: not cached by another test, even as a pixel alias."""
    image = decode_image(data, 64_000_000).copy()
    image[0, 0] = 255 - image[0, 0]
    return encode_image(image)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def ours(
    reply: dict, phrase: str, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    found = [i for i in reply["instances"] if i["prompt"] == phrase]
    assert reply["counts"][phrase] == len(found)
    scores = np.array([i["score"] for i in found])
    boxes = np.array([i["box"] for i in found]).reshape(-1, 4)
    masks = [coco_rle_decode(i["mask"]["coco_rle"]).to_full() for i in found]
    assert all(m.shape == (height, width) for m in masks)
    return scores, boxes, masks


def test_the_registry_builds_the_reference_weights(exact: TestClient, reference: tuple) -> None:
    served = concepts_of(exact).model.state_dict()
    built = reference[0].state_dict()
    assert served.keys() == built.keys()
    assert all(torch.equal(served[k], built[k]) for k in built)


@pytest.mark.parametrize("name", ["bus.jpg", "zidane.jpg"])
@pytest.mark.parametrize("exemplars", [None, ([[40.0, 200.0, 260.0, 600.0]], [[500.0, 50.0, 600.0, 150.0]])])
def test_instances_equal_transformers(
    exact: TestClient, reference: tuple, images: dict[str, bytes], name: str, exemplars: tuple | None
) -> None:
    image = decode_image(images[name], 64_000_000)
    height, width = image.shape[:2]
    body: dict = {
        "image": inline(images[name]),
        "text": PHRASES,
        "score_threshold": 0.2505,  # random weights score about 0.25: this keeps some queries of 20
        "mask_threshold": 0.5,
        "formats": ["coco_rle"],
    }
    if exemplars is not None:
        body |= {"positive_boxes": exemplars[0], "negative_boxes": exemplars[1]}
    reply = post(exact, body)
    assert (reply["width"], reply["height"]) == (width, height)
    compared = 0
    for phrase in PHRASES:
        want = reference_instances(reference, image, phrase, 0.2505, 0.5, exemplars)
        scores, boxes, masks = ours(reply, phrase, height, width)
        assert len(scores) == len(want["scores"])
        np.testing.assert_allclose(scores, want["scores"], atol=1e-5)
        np.testing.assert_allclose(boxes, want["boxes"], atol=0.02)  # the reply rounds to 0.01 px
        for i, mask in enumerate(masks):
            # Equal, except where the reference's probability is within 1e-5 of the threshold.
            assert not (want["masks_high"][i] & ~mask).any()
            assert not (mask & ~want["masks_low"][i]).any()
            compared += 1
    assert compared >= 3  # the threshold keeps some instances: the comparison is not vacuous


def test_float16_cache_stays_close(default: TestClient, reference: tuple, images: dict[str, bytes]) -> None:
    image = decode_image(images["bus.jpg"], 64_000_000)
    height, width = image.shape[:2]
    reply = post(default, {"image": inline(images["bus.jpg"]), "text": PHRASES, "score_threshold": 0.0,
                           "formats": ["coco_rle"]})  # fmt: skip
    for phrase in PHRASES:
        want = reference_instances(reference, image, phrase, 0.0, 0.5)
        scores, boxes, masks = ours(reply, phrase, height, width)
        assert len(scores) == len(want["scores"]) == 20
        np.testing.assert_allclose(scores, want["scores"], atol=1e-3)
        worst = min(iou(mask, want["masks"][i]) for i, mask in enumerate(masks))
        assert worst >= 0.99, worst


def test_cap_and_nms_apply_before_masks(
    exact: TestClient, reference: tuple, images: dict[str, bytes]
) -> None:
    image = decode_image(images["zidane.jpg"], 64_000_000)
    height, width = image.shape[:2]
    want = reference_instances(reference, image, "person", 0.0, 0.5)
    capped = post(exact, {"image": inline(images["zidane.jpg"]), "text": ["person"], "score_threshold": 0.0,
                          "max_instances": 3, "formats": ["coco_rle"]})  # fmt: skip
    scores, _, masks = ours(capped, "person", height, width)
    np.testing.assert_allclose(scores, want["scores"][:3], atol=1e-5)
    assert len(masks) == 3

    keep = nms(torch.as_tensor(want["boxes"]).float(), torch.as_tensor(want["scores"]).float(), 0.3).numpy()
    assert 0 < len(keep) < len(want["scores"])  # the suppression does something here
    suppressed = post(exact, {"image_id": capped["image_id"], "text": ["person"], "score_threshold": 0.0,
                              "nms_iou": 0.3, "masks": False})  # fmt: skip
    assert all("mask" not in i for i in suppressed["instances"])
    np.testing.assert_allclose([i["score"] for i in suppressed["instances"]], want["scores"][keep], atol=1e-5)


def test_vision_features_are_computed_once_per_image(exact: TestClient, images: dict[str, bytes]) -> None:
    concepts = concepts_of(exact)
    calls = {"vision": 0, "text": 0}

    def count(kind: str):  # noqa: ANN202
        def hook(*_: object) -> None:
            calls[kind] += 1

        return hook

    hooks = [
        concepts.model.vision_encoder.backbone.register_forward_hook(count("vision")),
        concepts.model.text_encoder.register_forward_hook(count("text")),
    ]
    try:
        data = own_pixels(images["bus.jpg"])
        first = post(exact, {"image": inline(data), "text": ["a zebra"]})
        assert first["cache_tier"] == "encode" and calls == {"vision": 1, "text": 1}
        second = post(exact, {"image_id": first["image_id"], "text": ["a giraffe"]})
        assert second["cache_tier"] == "l1" and calls == {"vision": 1, "text": 2}
        third = post(exact, {"image": inline(data), "text": ["a zebra", "a giraffe"]})
        assert third["cache_tier"] == "l1" and calls == {"vision": 1, "text": 2}  # both phrases cached too
        stats = concepts.text_cache_stats()
        assert stats["entries"] >= 2 and stats["hits"] >= 2
    finally:
        for hook in hooks:
            hook.remove()


def test_features_round_trip_through_l2_and_prefetch(default: TestClient, images: dict[str, bytes]) -> None:
    data = own_pixels(images["zidane.jpg"])
    queued = default.post("/v1/prefetch", json={"model": MODEL, "images": [inline(data)]})
    assert queued.status_code == 202, queued.text
    for _ in range(600):
        status = default.get(f"/v1/prefetch/{queued.json()['id']}").json()
        if status["state"] not in ("running", "queued"):
            break
        time.sleep(0.05)
    assert status["state"] == "completed" and status["encoded"] == 1, status
    first = post(default, {"image": inline(data), "text": ["person"], "formats": ["coco_rle"]})
    assert first["cache_tier"] == "l1"  # prefetched
    assert default.delete("/v1/cache").status_code == 200  # L1 only: the disk L2 keeps the features
    again = post(default, {"image_id": first["image_id"], "text": ["person"], "formats": ["coco_rle"]})
    assert again["cache_tier"] == "l2"
    assert again["instances"] == first["instances"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"text": []}, "no_prompt"),
        ({"text": ["  "]}, "bad_text"),
        ({"text": ["x" * (MAX_PHRASE_CHARS + 1)]}, "bad_text"),
        ({"text": [f"thing {i}" for i in range(MAX_PHRASES + 1)]}, "too_many_phrases"),
        ({"text": ["car"], "positive_boxes": [[0, 0, 5, 5]] * (MAX_EXEMPLARS + 1)}, "too_many_exemplars"),
        ({"text": ["car"], "positive_boxes": [[10, 10, 5000, 20]]}, "prompt_outside_image"),
        ({"text": ["car"], "negative_boxes": [[-1, 10, 50, 20]]}, "prompt_outside_image"),
        ({"text": ["car"], "positive_boxes": [[30, 10, 20, 20]]}, "bad_prompt"),
    ],
)
def test_bad_concept_requests(exact: TestClient, images: dict[str, bytes], body: dict, code: str) -> None:
    response = exact.post(f"/v1/concepts/{MODEL}", json={"image": inline(images["bus.jpg"]), **body})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code, response.json()


def test_models_without_the_head_asked_for(exact: TestClient, images: dict[str, bytes]) -> None:
    concept_to_sam = exact.post(
        "/v1/concepts/mobile_sam", json={"image": inline(images["bus.jpg"]), "text": ["x"]}
    )
    assert concept_to_sam.status_code == 404
    assert "no concept head" in concept_to_sam.json()["error"]["message"]
    # SAM 3 has a click head (tests/test_sam3_clicks.py); a detector's missing one is tested there too.
    click_to_sam3 = exact.post(
        f"/v1/sam/{MODEL}/segment", json={"image": inline(images["bus.jpg"]), "points": [[10, 10]]}
    )
    assert click_to_sam3.status_code == 200, click_to_sam3.text
    models = {m["name"]: m for m in exact.get("/v1/models").json()["models"]}
    assert (
        models[MODEL]["kinds"] == ["concept", "segmenter", "detector"]
        and models[MODEL]["weights"] == "random-init"
    )
    assert models[MODEL]["classes"] == {}  # no vocabulary configured: a detector of nothing


def test_a_checkpoint_with_other_keys_is_refused(tmp_path: Path, reference: tuple) -> None:
    from safetensors.torch import load_file, save_file

    model, processor = reference
    good = tmp_path / "good"
    model.save_pretrained(good)
    processor.save_pretrained(good)
    loaded, _ = load_sam3(good)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())

    tensors = load_file(good / "model.safetensors")
    for name, change in (("missing", "drop"), ("unexpected", "add")):
        bad = tmp_path / name
        bad.mkdir()
        for file in good.iterdir():
            (bad / file.name).write_bytes(file.read_bytes())
        edited = dict(tensors)
        if change == "drop":
            edited.pop("text_projection.weight")
        else:
            edited["text_encoder.extra.weight"] = torch.zeros(1)
        save_file(edited, bad / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(CheckpointMismatch, match=name):
            load_sam3(bad)


def test_the_registry_loads_a_snapshot_and_refuses_a_damaged_one(tmp_path: Path, reference: tuple) -> None:
    from safetensors.torch import load_file, save_file

    from models.registry import ModelRegistry
    from weights import store

    model, processor = reference
    directory = tmp_path / "weights" / MODEL
    tracker = random_tracker(model, 0)
    facebook_layout(directory, model, tracker)
    processor.save_pretrained(directory)
    for name in store.get_entry(MODEL).files:  # the tokenizer's other files, which this loader does not read
        if not (directory / name).exists():
            (directory / name).write_text("{}")
    registry = ModelRegistry(make_settings(tmp_path, models=[MODEL], random_init=False))
    registry.load_enabled()
    record = registry.record(MODEL)
    assert (record.state, record.weights) == ("loaded", "checkpoint"), record.message
    assert torch.equal(registry.concept(MODEL).model.text_projection.weight, model.text_projection.weight)
    clicks = registry.segmenter(MODEL).tracker.state_dict()  # type: ignore[attr-defined]
    assert all(torch.equal(clicks[k], v) for k, v in tracker.state_dict().items())

    intact = load_file(directory / "model.safetensors")
    for dropped in (
        "detector_model.detr_decoder.box_head.layer3.weight",
        "tracker_neck.fpn_layers.0.scale_layers.0.weight",
    ):
        tensors = {k: v for k, v in intact.items() if k != dropped}
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        registry = ModelRegistry(make_settings(tmp_path, models=[MODEL], random_init=True))
        registry.load_enabled()
        record = registry.record(MODEL)
        assert record.state == "failed" and "missing_keys" in record.message, (dropped, record.message)


def facebook_layout(directory: Path, detector: torch.nn.Module, tracker: torch.nn.Module) -> None:
    """A snapshot laid out as facebook/sam3's: a sam3_video config.json (detector and tracker configs) and one
    model.safetensors holding the detector (detector_model.*), the tracker's neck (tracker_neck.*) and its
    heads (tracker_model.*; its backbone is the detector's). Both transformers classes load it with no
    missing or unexpected key."""
    from safetensors.torch import save_file
    from transformers import Sam3TrackerVideoConfig, Sam3VideoConfig

    from models.sam3_clicks import tracker_config

    base = tracker_config(detector.config)
    video_tracker = Sam3TrackerVideoConfig(
        vision_config=base.vision_config.to_dict(),
        prompt_encoder_config=base.prompt_encoder_config.to_dict(),
        mask_decoder_config=base.mask_decoder_config.to_dict(),
    )
    config = Sam3VideoConfig(
        detector_config=detector.config.to_dict(), tracker_config=video_tracker.to_dict()
    )
    config.save_pretrained(directory)
    tensors = {f"detector_model.{k}": v for k, v in detector.state_dict().items()}
    tensors |= {f"tracker_neck.{k}": v for k, v in tracker.vision_encoder.neck.state_dict().items()}
    tensors |= {
        f"tracker_model.{k}": v for k, v in tracker.state_dict().items() if not k.startswith("vision_")
    }
    contiguous = {k: v.contiguous().clone() for k, v in tensors.items()}
    save_file(contiguous, directory / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.slow
def test_the_full_size_architecture_equals_transformers(images: dict[str, bytes]) -> None:
    """The full-size SAM 3 (840 M parameters, 1008-pixel input), built once: the cached FPN levels have the
    published shapes, and the ten best instances equal transformers' pipeline. About 3 minutes on 2 cores
    (two vision passes of about a minute each, plus the random initialisation)."""
    from models.concept import ConceptParams

    torch.manual_seed(0)
    model, processor = random_sam3()
    concepts = Sam3Concepts(MODEL, MODEL, model, processor, torch.device("cpu"), cache_dtype=torch.float32)
    image = decode_image(images["zidane.jpg"], 64_000_000)
    embedding = concepts.encode(image)
    assert {k: tuple(v.shape) for k, v in embedding.tensors.items()} == {
        "fpn_0": (1, 256, 288, 288),
        "fpn_1": (1, 256, 144, 144),
        "fpn_2": (1, 256, 72, 72),
    }
    inputs = processor(images=image, text="person", return_tensors="pt")
    with torch.inference_mode():
        outputs = model(**inputs)
    scores = (outputs.pred_logits.sigmoid() * outputs.presence_logits.sigmoid())[0]
    threshold = float(torch.sort(scores, descending=True).values[10])  # the ten best: bounded memory
    sizes = inputs["original_sizes"].tolist()
    want = {
        t: processor.post_process_instance_segmentation(outputs, threshold, t, sizes)[0]
        for t in (0.5, 0.5 - 1e-5, 0.5 + 1e-5)
    }
    order = torch.sort(want[0.5]["scores"], descending=True, stable=True).indices
    found = concepts.find(embedding, ["person"], ConceptParams(score_threshold=threshold, max_instances=50))[
        0
    ]
    assert len(found) == len(order) == 10
    np.testing.assert_allclose([i.score for i in found], want[0.5]["scores"][order].numpy(), atol=1e-5)
    height, width = image.shape[:2]
    boxes = np.clip(want[0.5]["boxes"][order].numpy(), 0, [width, height, width, height])
    np.testing.assert_allclose([i.box for i in found], boxes, atol=1e-3)
    for i, instance in enumerate(found):
        mask = instance.mask.to_full()
        assert not (want[0.5 + 1e-5]["masks"][order[i]].numpy().astype(bool) & ~mask).any()
        assert not (mask & ~want[0.5 - 1e-5]["masks"][order[i]].numpy().astype(bool)).any()
