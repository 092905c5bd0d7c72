"""SAM 3 clicks through /v1/sam/sam3/segment equal transformers' own Sam3TrackerModel + Sam3TrackerProcessor
(post_process_masks) for the same seeded random weights, image and prompts; a concept encode and a click
encode share one backbone pass; "click one, find all" equals Sam3Model with the click's box as exemplar.

The server builds `sam3` with random weights (seed 0) for the small architecture of its snapshot's config.json
(models/sam3.py TINY_CONFIG). The reference is built here from its own literal Sam3TrackerConfig, seeded the
same way the registry seeds the tracker, with the detector's backbone (SAM 3 has one backbone); its processor
is Sam3TrackerProcessor at the 224-pixel input with SAM 3's normalisation (mean and std 0.5, as the detector's
Sam3ImageProcessor: the tracker reads the detector's pixels). Two servers, a float32 cache and the default
float16 cache: scores within 1e-3 and masks IoU >= 0.999 on both.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from cvat_cli._internal import agent_driver_interaction
from fastapi.testclient import TestClient

from models.base import ImageEmbedding
from models.concept import MAX_EXEMPLARS
from models.sam3 import TINY_CONFIG, random_sam3, sam3_config
from models.sam3_clicks import Sam3Clicks
from models.shapes import RegionMask
from server.app import create_app
from server.cvat import agent_functions
from server.formats.rle import cvat_rle, cvat_rle_decode
from server.inputs.images import decode_image

from .conftest import encode_image, make_settings, synthetic_scene, ultralytics_asset
from .test_sam3_equivalence import ours, reference_instances

MODEL = "sam3"
SIZE = 224  # TINY_CONFIG's input
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# The tracker of TINY_CONFIG, written out: its vision config is the detector's (backbone and neck), the prompt
# encoder and mask decoder are as wide as the neck (32).
TRACKER_CONFIG = {
    "vision_config": {
        "model_type": "sam3_vision_model",
        "backbone_config": TINY_CONFIG["vision_config"]["backbone_config"],
        "fpn_hidden_size": 32,
        "backbone_feature_sizes": [[64, 64], [32, 32], [16, 16]],
    },
    "prompt_encoder_config": {"hidden_size": 32, "image_size": SIZE, "patch_size": 14},
    "mask_decoder_config": {
        "hidden_size": 32,
        "mlp_dim": 256,
        "iou_head_hidden_dim": 32,
        "num_attention_heads": 2,
    },
}


def app_client(tmp: Path, **settings: object) -> Iterator[TestClient]:
    sam3_config(TINY_CONFIG).save_pretrained(tmp / "weights" / MODEL)
    app = create_app(make_settings(tmp, models=[MODEL], **settings), load_models_in_background=False)
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def exact(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    yield from app_client(tmp_path_factory.mktemp("sam3c-exact"), cache_dtype="float32")


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    yield from app_client(
        tmp_path_factory.mktemp("sam3c-default"), cache_disk_dir=tmp_path_factory.mktemp("l2")
    )


@pytest.fixture(scope="module")
def reference() -> tuple[torch.nn.Module, object, torch.nn.Module, object]:
    """(Sam3Model, Sam3Processor, Sam3TrackerModel, Sam3TrackerProcessor), seeded as the server's are."""
    from transformers import Sam3TrackerConfig, Sam3TrackerModel, Sam3TrackerProcessor
    from transformers.models.sam2.image_processing_sam2 import Sam2ImageProcessor

    torch.manual_seed(0)  # LABELSERVE_RANDOM_SEED
    detector, processor = random_sam3(TINY_CONFIG)
    torch.manual_seed(0)
    tracker = Sam3TrackerModel(Sam3TrackerConfig(**TRACKER_CONFIG)).eval()
    tracker.vision_encoder.backbone.load_state_dict(detector.vision_encoder.backbone.state_dict())
    image_processor = Sam2ImageProcessor(
        size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return detector, processor, tracker, Sam3TrackerProcessor(image_processor=image_processor)


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return {
        "bus.jpg": ultralytics_asset("bus.jpg").read_bytes(),
        "synthetic": encode_image(synthetic_scene(640, 480)),
    }


def clicks_of(client: TestClient) -> Sam3Clicks:
    segmenter = client.app.state.services.registry.segmenter(MODEL)
    assert isinstance(segmenter, Sam3Clicks)
    return segmenter


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def inline(data: bytes) -> dict:
    return {"base64": base64.b64encode(data).decode()}


def segment(client: TestClient, data: bytes, **body: object) -> dict:
    response = client.post(f"/v1/sam/{MODEL}/segment", json={"image": inline(data), "refine": False, **body})
    assert response.status_code == 200, response.text
    return response.json()


def masks_of(body: dict) -> list[np.ndarray]:
    return [cvat_rle_decode(m["cvat"], body["width"], body["height"]).to_full() for m in body["masks"]]


def reference_predict(
    reference, image: np.ndarray, prompt: dict, multimask: bool, input_masks: torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Sam3TrackerModel + Sam3TrackerProcessor: (masks [M, H, W], scores [M], low-res logits [M, h, w])."""
    _, _, tracker, processor = reference
    kwargs: dict = {}
    if prompt.get("points"):
        kwargs["input_points"] = [[prompt["points"]]]
        kwargs["input_labels"] = [[prompt.get("labels", [1] * len(prompt["points"]))]]
    if "box" in prompt:
        kwargs["input_boxes"] = [[prompt["box"]]]
    if "boxes" in prompt:
        kwargs["input_boxes"] = [prompt["boxes"]]
    inputs = processor(images=image, return_tensors="pt", **kwargs)
    sizes = inputs.pop("original_sizes")
    with torch.inference_mode():
        outputs = tracker(**inputs, input_masks=input_masks, multimask_output=multimask)
    masks = processor.post_process_masks(outputs.pred_masks, sizes)[0]
    return masks.numpy(), outputs.iou_scores[0].numpy(), outputs.pred_masks[0]


def prompts_for(width: int, height: int) -> list[dict]:
    cx, cy = width * 0.45, height * 0.55
    box = [width * 0.1, height * 0.2, width * 0.7, height * 0.9]
    return [
        {"points": [[cx, cy]], "multimask_output": True},  # one click: three candidates
        {"points": [[cx, cy]], "multimask_output": False},  # one mask (dynamic multimask by stability)
        {"points": [[cx, cy], [width * 0.2, height * 0.3]], "labels": [1, 0]},  # with a negative click
        {"box": box},
        {"points": [[cx, cy]], "box": box},
        {"points": [[0, 0], [width, height]]},  # the image's corners are inside (pixel-edge coordinates)
    ]


def assert_matches(body: dict, ref_masks: np.ndarray, ref_scores: np.ndarray, floor: float, what) -> None:
    order = np.argsort(-ref_scores, kind="stable")[: len(body["masks"])]
    for mask, out, index in zip(masks_of(body), body["masks"], order, strict=True):
        assert abs(out["score"] - float(ref_scores[index])) < 1e-3, what
        assert iou(mask, ref_masks[index]) >= floor, (what, iou(mask, ref_masks[index]))
        assert out["area"] == int(mask.sum())


def test_the_server_holds_the_reference_weights_with_one_backbone(exact: TestClient, reference) -> None:
    detector, _, tracker, _ = reference
    services = exact.app.state.services
    clicks, concepts = clicks_of(exact), services.registry.concept(MODEL)
    expected = tracker.state_dict()
    ours = clicks.tracker.state_dict()
    assert ours.keys() == expected.keys() and all(torch.equal(ours[k], expected[k]) for k in expected)
    # One backbone module for both heads (facebook/sam3 loads the detector's backbone into the tracker).
    assert clicks.tracker.vision_encoder.backbone is concepts.model.vision_encoder.backbone
    models = {m["name"]: m for m in exact.get("/v1/models").json()["models"]}
    assert models[MODEL]["kinds"] == ["concept", "segmenter", "detector"]


@pytest.mark.parametrize("cache", ["exact", "default"])
@pytest.mark.parametrize("image", ["bus.jpg", "synthetic"])
def test_masks_and_scores_equal_sam3_tracker_model(
    request: pytest.FixtureRequest, reference, images, cache: str, image: str
) -> None:
    """Clicks, negative clicks, a box, box + click, multimask and single mask, on float32 and float16
    features; the cache entry is the tracker's three maps only."""
    client: TestClient = request.getfixturevalue(cache)
    pixels = decode_image(images[image], 64_000_000)
    height, width = pixels.shape[:2]
    floor = 0.999  # measured worst: 0.99993 (float32), 0.99973 (float16); docs/cache.md
    for prompt in prompts_for(width, height):
        multimask = prompt.get("multimask_output", False)
        ref_masks, ref_scores, _ = reference_predict(reference, pixels, prompt, multimask)
        body = segment(client, images[image], **{"max_masks": 3, "multimask_output": multimask, **prompt})
        assert len(body["masks"]) == ref_scores.shape[1]
        assert_matches(body, ref_masks[0], ref_scores[0], floor, (cache, image, prompt))
    cached = client.app.state.services.sam.cached_embedding(MODEL, body["image_id"]).embedding
    dtype = torch.float32 if cache == "exact" else torch.float16
    assert {n: (t.dtype, tuple(t.shape)) for n, t in cached.tensors.items()} == {
        "trk_high_res_0": (dtype, (1, 4, 64, 64)),
        "trk_high_res_1": (dtype, (1, 8, 32, 32)),
        "trk_image_embed": (dtype, (1, 32, 16, 16)),
    }


def test_refinement_reuses_the_first_clicks_logits_as_input_masks(
    exact: TestClient, reference, images
) -> None:
    """The second click starts from the first one's best low-res logits: Sam3TrackerModel(input_masks=...)."""
    pixels = decode_image(images["bus.jpg"], 64_000_000)
    first = {"points": [[400, 500]]}
    second = {"points": [[400, 500], [200, 300]], "labels": [1, 0]}
    _, scores, logits = reference_predict(reference, pixels, first, multimask=True)
    best = logits[0, int(np.argmax(scores[0]))][None, None]
    ref_masks, ref_scores, ref_logits = reference_predict(reference, pixels, second, False, input_masks=best)
    image_id = segment(exact, images["bus.jpg"], **first)["image_id"]
    exact.post(f"/v1/sam/{MODEL}/segment", json={"image_id": image_id, **first})
    body = exact.post(f"/v1/sam/{MODEL}/segment", json={"image_id": image_id, **second}).json()
    assert body["refined_from_points"] == 1
    assert_matches(body, ref_masks[0], ref_scores[0], 0.999, "refined")
    _, _, plain_logits = reference_predict(reference, pixels, second, multimask=False)
    # The mask prompt changed the decode (random weights give logits near 1e-5: relative to their size).
    assert float((plain_logits - ref_logits).abs().max()) > 0.5 * float(plain_logits.abs().max())


def test_mask_prompt_equals_the_tracker_with_its_low_res_logits(exact: TestClient, reference, images) -> None:
    """A CVAT mask as the prompt (the synthetic scene's disc, by construction): the decode equals the tracker
    given the logits labelserve makes of it, at its 64 × 64 mask input."""
    pixels = decode_image(images["synthetic"], 64_000_000)
    height, width = pixels.shape[:2]
    yy, xx = np.mgrid[:height, :width]
    disc = (xx - width * 0.3) ** 2 + (yy - height * 0.5) ** 2 < (min(width, height) * 0.2) ** 2
    mask = RegionMask.from_full(disc)
    logits = clicks_of(exact).low_res_from_mask(ImageEmbedding({}, (height, width), (SIZE, SIZE)), mask)
    assert logits.shape == (1, 64, 64)
    prompt = {"points": [[width * 0.3, height * 0.5]]}
    ref_masks, ref_scores, _ = reference_predict(reference, pixels, prompt, False, input_masks=logits[None])
    body = segment(
        exact,
        images["synthetic"],
        **prompt,
        multimask_output=False,
        mask_input={"cvat": cvat_rle(mask.tight())},
    )
    assert_matches(body, ref_masks[0], ref_scores[0], 0.999, "mask prompt")
    alone = segment(
        exact, images["synthetic"], multimask_output=False, mask_input={"cvat": cvat_rle(mask.tight())}
    )
    ref_masks, ref_scores, _ = reference_predict(reference, pixels, {}, False, input_masks=logits[None])
    assert_matches(alone, ref_masks[0], ref_scores[0], 0.999, "mask alone")


@pytest.mark.parametrize("multimask", [False, True])
def test_boxes_in_one_batch_equal_the_tracker_with_a_box_batch(
    exact: TestClient, reference, images, multimask: bool
) -> None:
    """`boxes`: one mask per box (its best), equal to input_boxes [1, B, 4]; 20 boxes: two decoder passes."""
    pixels = decode_image(images["bus.jpg"], 64_000_000)
    height, width = pixels.shape[:2]
    rng = np.random.default_rng(5)
    corners = rng.uniform(0, 1, (20, 2, 2)) * [width - 8, height - 8]
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1) + 8], axis=1).astype(np.float32)
    ref_masks, ref_scores, _ = reference_predict(reference, pixels, {"boxes": boxes.tolist()}, multimask)
    body = segment(exact, images["bus.jpg"], boxes=boxes.tolist(), multimask_output=multimask)
    assert len(body["masks"]) == len(boxes)
    for i, (mask, out) in enumerate(zip(masks_of(body), body["masks"], strict=True)):
        best = int(np.argsort(-ref_scores[i], kind="stable")[0])
        assert abs(out["score"] - float(ref_scores[i][best])) < 1e-3
        assert iou(mask, ref_masks[i][best]) >= 0.999, i


def test_a_concept_encode_fills_the_click_entry_from_the_same_backbone_pass(
    default: TestClient, images
) -> None:
    """A concept request on a new image encodes once (both necks on one backbone pass): a click right after
    is an L1 hit, and its masks equal those of a click-only encode of the image on the exact server."""
    data = encode_image(synthetic_scene(320, 240, seed=7))
    stats = default.get("/v1/cache/stats").json()["encoders"]
    before = {
        name: stats.get(name, {}).get("done", {}).get("interactive", 0) for name in (MODEL, "sam3/clicks")
    }
    found = default.post(f"/v1/concepts/{MODEL}", json={"image": inline(data), "text": ["disc"]})
    assert found.status_code == 200, found.text
    click = default.post(
        f"/v1/sam/{MODEL}/segment", json={"image_id": found.json()["image_id"], "points": [[100, 120]]}
    )
    assert click.status_code == 200, click.text
    assert click.json()["cache_tier"] == "l1"
    stats = default.get("/v1/cache/stats").json()["encoders"]
    after = {
        name: stats.get(name, {}).get("done", {}).get("interactive", 0) for name in (MODEL, "sam3/clicks")
    }
    assert after[MODEL] == before[MODEL] + 1 and after["sam3/clicks"] == before["sam3/clicks"]
    # The click features of that pass reached L2 too, under their own key and tag: with L1 cleared, the same
    # click is read from there and answers the same masks.
    assert default.delete("/v1/cache").status_code == 200
    again = default.post(
        f"/v1/sam/{MODEL}/segment", json={"image_id": found.json()["image_id"], "points": [[100, 120]]}
    )
    assert again.status_code == 200, again.text
    assert again.json()["cache_tier"] == "l2" and again.json()["masks"] == click.json()["masks"]


# ---- click one, find all ----------------------------------------------------------------------------------
def concepts(client: TestClient, body: dict) -> dict:
    response = client.post(f"/v1/concepts/{MODEL}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("text", [["disc"], []])
@pytest.mark.parametrize("example", [{"points": [[192, 240]]}, {"box": [100, 150, 290, 330]}])
def test_click_one_find_all_equals_sam3_model_with_the_masks_box(
    exact: TestClient, reference, text: list[str], example: dict
) -> None:
    """The example's mask is the one /segment gives for the same prompts; its bounds (by construction, from
    that mask) are the exemplar box, and the instances equal Sam3Model + Sam3Processor given that box as a
    positive exemplar, with the text, or alone (the processor's "visual" phrase)."""
    data = encode_image(synthetic_scene(640, 480, seed=3))
    pixels = decode_image(data, 64_000_000)
    height, width = pixels.shape[:2]
    clicked = segment(exact, data, **example)
    mask = masks_of(clicked)[0]
    rows, cols = np.nonzero(mask)
    box = [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]
    body = {"image": inline(data), "text": text, "example": example, "score_threshold": 0.2505}
    found = concepts(exact, {**body, "formats": ["coco_rle"]})
    assert found["example"] == {"box": box, "score": clicked["masks"][0]["score"]}
    phrase = text[0] if text else "visual"
    detector, processor, _, _ = reference
    want = reference_instances((detector, processor), pixels, phrase, 0.2505, 0.5, ([box], []))
    scores, boxes, masks = ours(found, phrase, height, width)
    assert len(scores) == len(want["scores"]) > 0
    np.testing.assert_allclose(scores, want["scores"], atol=1e-5)
    np.testing.assert_allclose(boxes, want["boxes"], atol=0.02)
    for i, instance in enumerate(masks):
        assert not (want["masks_high"][i] & ~instance).any()
        assert not (instance & ~want["masks_low"][i]).any()
    # The same as giving that box yourself, on the cached features.
    by_box = concepts(exact, {**body, "image": None, "image_id": found["image_id"], "example": None,
                              "positive_boxes": [box], "formats": ["coco_rle"]})  # fmt: skip
    assert by_box["cache_tier"] == "l1" and by_box["instances"] == found["instances"]


def test_click_one_find_all_encodes_the_image_once(default: TestClient) -> None:
    """A new image with an example: one backbone pass gives both heads their features."""
    data = encode_image(synthetic_scene(320, 240, seed=11))
    registry = default.app.state.services.registry
    backbone = registry.concept(MODEL).model.vision_encoder.backbone
    calls = []
    hook = backbone.register_forward_hook(lambda *_: calls.append(1))
    try:
        found = concepts(
            default, {"image": inline(data), "text": ["disc"], "example": {"points": [[96, 120]]}}
        )
    finally:
        hook.remove()
    assert found["cache_tier"] == "encode" and found["example"]["box"] and len(calls) == 1


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"example": {}}, 422, "no_prompt"),
        ({"example": {"points": [[5000, 10]]}}, 422, "prompt_outside_image"),
        ({"example": {"points": [[10, 10]], "labels": [1, 0]}}, 422, "bad_prompt"),
        ({"example": {"points": [[10, 10]], "mask_input": {}}}, 422, "invalid_request"),
        (
            {
                "text": ["disc"],
                "example": {"points": [[10, 10]]},
                "positive_boxes": [[0, 0, 5, 5]] * MAX_EXEMPLARS,
            },
            422,
            "too_many_exemplars",
        ),  # fmt: skip
        ({"text": []}, 422, "no_prompt"),
    ],
)
def test_bad_examples_get_a_clear_4xx(exact: TestClient, body: dict, status: int, code: str) -> None:
    data = encode_image(synthetic_scene(64, 48))
    response = exact.post(f"/v1/concepts/{MODEL}", json={"image": inline(data), **body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]


def test_heads_a_model_lacks_get_a_clear_4xx(tmp_path: Path) -> None:
    """A click request to a model without a click head (a YOLO detector), a concept request to one without a
    concept head (SAM), and "click one, find all" on one without a click head each say what to do."""
    app = create_app(
        make_settings(tmp_path, models=["mobile_sam", "yolo11n"]), load_models_in_background=False
    )
    data = encode_image(synthetic_scene(64, 48))
    with TestClient(app) as client:
        for path, body in (
            ("/v1/sam/yolo11n/segment", {"image": inline(data), "points": [[5, 5]]}),
            ("/v1/sam/yolo11n/embed", {"image": inline(data)}),
            ("/v1/concepts/mobile_sam", {"image": inline(data), "text": ["car"]}),
            ("/v1/concepts/yolo11n", {"image": inline(data), "text": ["car"]}),
        ):
            response = client.post(path, json=body)
            assert 400 <= response.status_code < 500, (path, response.text)
            error = response.json()["error"]
            head = "click head" if "/sam/" in path else "concept head"
            assert head in error["message"] and "GET /v1/models" in error["message"], error


def test_the_full_size_tracker_is_transformers_default_and_caches_10_mib_per_image() -> None:
    """The tracker config derived from the full-size SAM 3 is transformers' own Sam3TrackerConfig(); built on
    the meta device (no memory, no weights), its cached maps have the published shapes: 10.125 MiB float16."""
    from types import SimpleNamespace

    from transformers import Sam3TrackerConfig, Sam3TrackerModel

    from models.sam3_clicks import tracker_config

    ours = tracker_config(sam3_config())
    assert ours.to_dict() == Sam3TrackerConfig().to_dict()
    with torch.device("meta"):
        tracker = Sam3TrackerModel(ours)
        spatial = torch.empty(1, 1024, 72, 72)  # the ViT's output at the 1008-pixel input
    maps = Sam3Clicks.features(SimpleNamespace(tracker=tracker), spatial)  # type: ignore[arg-type]
    assert {n: tuple(t.shape) for n, t in maps.items()} == {
        "trk_high_res_0": (1, 32, 288, 288),
        "trk_high_res_1": (1, 64, 144, 144),
        "trk_image_embed": (1, 256, 72, 72),
    }
    assert sum(t.numel() for t in maps.values()) * 2 == 10.125 * 2**20


def test_cvat_agent_interaction_function_serves_sam3_clicks(
    default: TestClient, images, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CVAT's AI-agent InteractionFunction with model=sam3 answers the masks of /segment for the same clicks,
    and its re-encoded frame (PNG) reuses the click features (a pixel alias: no second encode)."""
    data = images["bus.jpg"]
    native = segment(default, data, points=[[400, 500], [100, 200]], labels=[1, 0])["masks"][0]["cvat"]
    monkeypatch.setattr(agent_functions, "_client", lambda url, key, timeout: TestClient(default.app))
    function = agent_functions.InteractionFunction("http://labelserve", model=MODEL)
    encodes = default.get("/v1/cache/stats").json()["encoders"]["sam3/clicks"]["done"]["interactive"]
    frame = function.preprocess_image(None, PIL.Image.open(io.BytesIO(data)))
    clicks = agent_driver_interaction._InteractionPromptsImpl(
        pos_points=((400.0, 500.0),), neg_points=((100.0, 200.0),), bounding_box=None
    )
    (shape,) = function.detect(None, frame, clicks)
    assert shape.type == "mask" and shape.points == native
    assert default.get("/v1/cache/stats").json()["encoders"]["sam3/clicks"]["done"]["interactive"] == encodes


def test_cvat_nuclio_interactor_serves_sam3_clicks(default: TestClient, images) -> None:
    """CVAT Community's AI Tools list SAM 3's clicks as an interactor function of their own (the model's
    own id is its concept detector when it has a vocabulary); it answers /segment's mask for the clicks."""
    data = images["bus.jpg"]
    native = segment(default, data, points=[[400, 500], [100, 200]], labels=[1, 0])["masks"][0]["cvat"]
    functions = default.get("/api/functions").json()
    assert "labelserve-sam3" not in functions  # no vocabulary configured here: no detector
    annotations = functions["labelserve-sam3-clicks"]["metadata"]["annotations"]
    assert (annotations["type"], annotations["name"]) == ("interactor", "labelserve sam3 clicks")
    frame = base64.b64encode(data).decode()
    payload = {"image": frame, "pos_points": [[400, 500]], "neg_points": [[100, 200]]}
    headers = {"x-nuclio-function-name": "labelserve-sam3-clicks"}
    reply = default.post("/api/function_invocations", json=payload, headers=headers)
    assert reply.status_code == 200, reply.text
    (shape,) = reply.json()["shapes"]
    assert shape["type"] == "mask" and shape["points"] == native
