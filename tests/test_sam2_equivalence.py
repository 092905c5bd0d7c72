"""labelserve's SAM 2.1 masks and scores equal sam2.SAM2ImagePredictor's for the same weights and prompts.

The server builds sam2.1_hiera_tiny with seeded random weights (LABELSERVE_RANDOM_INIT, seed 0); the reference
is `SAM2ImagePredictor(build_sam2(config, None))` from the same seed. Two servers: one caching float32 (the
exact path: equal up to float noise) and one with the default float16 cache, whose masks must stay within
the same tolerance (IoU ≥ 0.999, scores within 1e-3): the evidence for caching all three tensors in float16.
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
from sam2.build_sam import build_sam2
from sam2.sam2_image_predictor import SAM2ImagePredictor
from skimage import data as skdata

from models.base import ImageEmbedding
from models.sam2 import SAM2_CONFIGS, Sam2Segmenter
from models.shapes import RegionMask
from server.api.routes.nuclio import BROWSER_SAM_ID
from server.app import create_app
from server.cvat import agent_functions
from server.formats.rle import cvat_rle, cvat_rle_decode
from server.inputs.images import decode_image

from .conftest import encode_image, make_settings, synthetic_scene, ultralytics_asset

MODEL = "sam2.1_hiera_tiny"
MAX = 64_000_000
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def app_client(tmp: Path, **settings: object) -> Iterator[TestClient]:
    app = create_app(make_settings(tmp, models=[MODEL], **settings), load_models_in_background=False)
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def exact(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    yield from app_client(tmp_path_factory.mktemp("sam2-exact"), cache_dtype="float32")


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    yield from app_client(tmp_path_factory.mktemp("sam2-default"))


def segmenter_of(client: TestClient) -> Sam2Segmenter:
    segmenter = client.app.state.services.registry.segmenter(MODEL)
    assert isinstance(segmenter, Sam2Segmenter)
    return segmenter


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return {
        "bus.jpg": ultralytics_asset("bus.jpg").read_bytes(),
        "zidane.jpg": ultralytics_asset("zidane.jpg").read_bytes(),
        "astronaut": encode_image(skdata.astronaut()),
        "synthetic": encode_image(synthetic_scene(640, 480)),
    }


@pytest.fixture(scope="module")
def reference_model() -> torch.nn.Module:
    torch.manual_seed(0)  # LABELSERVE_RANDOM_SEED's default
    return build_sam2(SAM2_CONFIGS[MODEL], None, device="cpu")


@pytest.fixture(scope="module")
def predictors(reference_model: torch.nn.Module, images: dict[str, bytes]) -> dict[str, SAM2ImagePredictor]:
    out = {}
    for name, data in images.items():
        predictor = SAM2ImagePredictor(reference_model)
        with torch.inference_mode():
            predictor.set_image(decode_image(data, MAX))
        out[name] = predictor
    return out


def prompts_for(width: int, height: int) -> list[dict]:
    cx, cy = width * 0.45, height * 0.55
    box = [width * 0.1, height * 0.2, width * 0.7, height * 0.9]
    return [
        {"points": [[cx, cy]]},  # one click: three candidates (multimask)
        {"points": [[cx, cy], [width * 0.2, height * 0.3]], "labels": [1, 0]},  # with a negative click
        {"box": box},
        {"points": [[cx, cy]], "box": box},
        {"points": [[0, 0], [width, height]]},  # the image's corners are inside (pixel-edge coordinates)
        {"points": [[width * 0.7, height * 0.3]], "multimask_output": True, "max_masks": 3},
    ]


def reference_predict(predictor: SAM2ImagePredictor, prompt: dict, multimask: bool, mask_input=None):
    points = np.array(prompt["points"], np.float32) if prompt.get("points") else None
    labels = np.array(prompt.get("labels", [1] * len(points)), np.int32) if points is not None else None
    box = np.array(prompt["box"], np.float32) if "box" in prompt else None
    with torch.inference_mode():
        return predictor.predict(points, labels, box, mask_input, multimask_output=multimask)


def masks_of(body: dict) -> list[np.ndarray]:
    return [cvat_rle_decode(m["cvat"], body["width"], body["height"]).to_full() for m in body["masks"]]


def assert_matches(body: dict, ref_masks: np.ndarray, ref_scores: np.ndarray, what: object) -> None:
    """Our masks are the reference's, best score first, each within the tolerance."""
    order = np.argsort(-ref_scores, kind="stable")[: len(body["masks"])]
    for mask, out, index in zip(masks_of(body), body["masks"], order, strict=True):
        assert abs(out["score"] - float(ref_scores[index])) < 1e-3, what
        assert iou(mask, ref_masks[index]) >= 0.999, what
        assert out["area"] == int(mask.sum())


def segment(client: TestClient, data: bytes, **body: object) -> dict:
    image = {"base64": base64.b64encode(data).decode()}
    response = client.post(f"/v1/sam/{MODEL}/segment", json={"image": image, "refine": False, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_server_holds_the_reference_weights(exact: TestClient, default: TestClient, reference_model) -> None:
    expected = reference_model.state_dict()
    for client in (exact, default):
        ours = segmenter_of(client).model.state_dict()
        assert ours.keys() == expected.keys() and all(torch.equal(ours[k], expected[k]) for k in expected)


@pytest.mark.parametrize("cache", ["exact", "default"])
@pytest.mark.parametrize("image", ["bus.jpg", "zidane.jpg", "astronaut", "synthetic"])
def test_masks_and_scores_equal_sam2_image_predictor(
    request: pytest.FixtureRequest, predictors, images, cache: str, image: str
) -> None:
    """Clicks, negative clicks, boxes, box + click, multimask, on float32 and on float16 cached features."""
    client: TestClient = request.getfixturevalue(cache)
    predictor = predictors[image]
    height, width = predictor._orig_hw[0]
    for prompt in prompts_for(width, height):
        multimask = prompt.get("multimask_output", len(prompt.get("points", [])) == 1 and "box" not in prompt)
        ref_masks, ref_scores, _ = reference_predict(predictor, prompt, multimask)
        body = segment(client, images[image], **{"max_masks": 3, **prompt})
        assert len(body["masks"]) == len(ref_scores)
        assert_matches(body, ref_masks, ref_scores, (cache, image, prompt))
    # The cache holds the three maps in its precision: 16 MiB per image in float32, 8 MiB in float16.
    cached = client.app.state.services.sam.cached_embedding(MODEL, body["image_id"]).embedding
    dtype = torch.float32 if cache == "exact" else torch.float16
    assert {n: (t.dtype, tuple(t.shape)) for n, t in cached.tensors.items()} == {
        "high_res_0": (dtype, (1, 32, 256, 256)),
        "high_res_1": (dtype, (1, 64, 128, 128)),
        "vision_feat": (dtype, (1, 256, 64, 64)),
    }
    assert cached.nbytes == (16 if cache == "exact" else 8) * 2**20


@pytest.mark.parametrize("cache", ["exact", "default"])
def test_refinement_reuses_the_first_clicks_logits_like_predict_with_mask_input(
    request: pytest.FixtureRequest, predictors, images, cache: str
) -> None:
    """The second click's decode starts from the first one's best low-res logits, clamped to ±32 as the
    predictor returns them: predict(mask_input=...)."""
    client: TestClient = request.getfixturevalue(cache)
    predictor = predictors["zidane.jpg"]
    first = {"points": [[600, 400]]}
    second = {"points": [[600, 400], [300, 200]], "labels": [1, 0]}
    _, scores, logits = reference_predict(predictor, first, multimask=True)
    ref_masks, ref_scores, _ = reference_predict(
        predictor, second, multimask=False, mask_input=logits[np.argmax(scores)][None]
    )
    image_id = segment(client, images["zidane.jpg"], **first)["image_id"]
    r1 = client.post(f"/v1/sam/{MODEL}/segment", json={"image_id": image_id, **first})
    assert r1.json()["refined_from_points"] is None
    body = client.post(f"/v1/sam/{MODEL}/segment", json={"image_id": image_id, **second}).json()
    assert body["refined_from_points"] == 1
    assert_matches(body, ref_masks, ref_scores, "refined")
    plain_masks, plain_scores, _ = reference_predict(predictor, second, multimask=False)
    assert abs(float(plain_scores[0]) - float(ref_scores[0])) > 1e-4  # refinement changed the answer


def test_mask_prompt_equals_predict_with_its_low_res_logits(exact: TestClient, predictors, images) -> None:
    """A CVAT mask as the prompt: the decode equals predict(mask_input=) of the logits labelserve makes of
    it (the disc of the synthetic scene, drawn by construction)."""
    predictor = predictors["synthetic"]
    height, width = predictor._orig_hw[0]
    yy, xx = np.mgrid[:height, :width]
    disc = (xx - width * 0.3) ** 2 + (yy - height * 0.5) ** 2 < (min(width, height) * 0.2) ** 2
    mask = RegionMask.from_full(disc)
    segmenter = segmenter_of(exact)
    embedding = ImageEmbedding({}, (height, width), (1024, 1024))
    logits = segmenter.low_res_from_mask(embedding, mask)
    assert logits.shape == (1, 256, 256)
    prompt = {"points": [[width * 0.3, height * 0.5]]}
    ref_masks, ref_scores, _ = reference_predict(predictor, prompt, False, mask_input=logits.numpy())
    body = segment(exact, images["synthetic"], **prompt, mask_input={"cvat": cvat_rle(mask.tight())})
    assert_matches(body, ref_masks, ref_scores, "mask prompt")


@pytest.mark.parametrize("multimask", [False, True])
def test_boxes_in_one_batch_equal_predict_with_a_box_array(
    exact: TestClient, predictors, images, multimask: bool
) -> None:
    """`boxes`: one mask per box, equal to predict(box=[B, 4]), which batches them on one image too; more
    boxes than one decoder pass takes (16), so the chunking is covered."""
    predictor = predictors["bus.jpg"]
    height, width = predictor._orig_hw[0]
    rng = np.random.default_rng(5)
    corners = rng.uniform(0, 1, (20, 2, 2)) * [width - 8, height - 8]
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1) + 8], axis=1).astype(np.float32)
    with torch.inference_mode():
        ref_masks, ref_scores, _ = predictor.predict(box=boxes, multimask_output=multimask)
    body = segment(exact, images["bus.jpg"], boxes=boxes.tolist(), multimask_output=multimask)
    assert len(body["masks"]) == len(boxes)
    for i, (mask, out) in enumerate(zip(masks_of(body), body["masks"], strict=True)):
        best = int(np.argsort(-ref_scores[i], kind="stable")[0])
        assert abs(out["score"] - float(ref_scores[i][best])) < 1e-3
        assert iou(mask, ref_masks[i][best]) >= 0.999, i


@pytest.mark.parametrize("size", [(1080, 810), (3000, 4000), (480, 640), (12, 7), (100, 2000), (1024, 1024)])
def test_region_upsampling_equals_postprocess_masks(exact: TestClient, size: tuple[int, int]) -> None:
    """Both upsampling paths (region-only on the CPU, full on a GPU) give SAM2Transforms.postprocess_masks."""
    segmenter = segmenter_of(exact)
    height, width = size
    embedding = ImageEmbedding({}, (height, width), (1024, 1024))
    generator = torch.Generator().manual_seed(height * 7 + width)
    smooth = torch.nn.functional.interpolate(
        torch.randn(4, 1, 16, 16, generator=generator), (256, 256), mode="bilinear", align_corners=False
    )[:, 0]
    cases = [smooth[0], smooth[1] - 1.0, smooth[2] + 3.0, -torch.ones(256, 256), smooth[3] - 1.5]
    for logits in cases:
        reference = segmenter.transforms.postprocess_masks(logits[None, None], (height, width))[0, 0] > 0
        ours = segmenter.upsample(embedding, logits)
        assert iou(ours.to_full(), reference.numpy()) >= 0.999
        assert ours.to_full().shape == (height, width)
        assert np.array_equal(segmenter.upsample_full(embedding, logits).to_full(), reference.numpy())


def test_cvat_interactor_and_agent_function_serve_sam2(
    default: TestClient, images, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CVAT's Nuclio interactor and the AI agent's InteractionFunction answer with SAM 2.1 as with SAM: the
    masks of /segment for the same clicks, and the agent's re-encoded frame (PNG) reuses the embedding."""
    functions = default.get("/api/functions").json()
    assert functions["labelserve-sam2.1-hiera-tiny"]["metadata"]["annotations"]["type"] == "interactor"
    assert functions["labelserve-track-sam2.1-hiera-tiny"]["metadata"]["annotations"]["type"] == "tracker"
    assert BROWSER_SAM_ID not in functions  # CVAT's browser decoder cannot read SAM 2 embeddings
    data = images["zidane.jpg"]
    native = segment(default, data, points=[[700, 350], [150, 600]], labels=[1, 0])["masks"][0]["cvat"]
    frame_b64 = base64.b64encode(data).decode()
    payload = {"image": frame_b64, "pos_points": [[700, 350]], "neg_points": [[150, 600]]}
    headers = {"x-nuclio-function-name": "labelserve-sam2.1-hiera-tiny"}
    reply = default.post("/api/function_invocations", json=payload, headers=headers)
    assert reply.status_code == 200, reply.text
    assert reply.json()["shapes"][0]["points"] == native

    monkeypatch.setattr(agent_functions, "_client", lambda url, key, timeout: TestClient(default.app))
    function = agent_functions.InteractionFunction("http://labelserve", model=MODEL)
    encodes = default.get("/v1/cache/stats").json()["encoders"][MODEL]["done"]["interactive"]
    frame = function.preprocess_image(None, PIL.Image.open(io.BytesIO(data)))
    clicks = agent_driver_interaction._InteractionPromptsImpl(
        pos_points=((700.0, 350.0),), neg_points=((150.0, 600.0),), bounding_box=None
    )
    (shape,) = function.detect(None, frame, clicks)
    assert shape.type == "mask" and shape.points == native
    assert default.get("/v1/cache/stats").json()["encoders"][MODEL]["done"]["interactive"] == encodes
