"""labelserve's masks and scores equal segment_anything.SamPredictor's for the same weights and prompts."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from segment_anything import SamPredictor
from skimage import data as skdata

from models.base import ImageEmbedding
from models.sam import SamSegmenter
from server.formats.rle import cvat_rle_decode
from server.inputs.images import decode_image

from .conftest import encode_image, synthetic_scene

MAX = 64_000_000


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def segmenter_of(client: TestClient) -> SamSegmenter:
    return client.app.state.services.registry.segmenter("mobile_sam")


def masks_of(response_json: dict) -> list[np.ndarray]:
    width, height = response_json["width"], response_json["height"]
    return [cvat_rle_decode(m["cvat"], width, height).to_full() for m in response_json["masks"]]


@pytest.fixture(scope="module")
def images(bus_jpg: bytes) -> dict[str, bytes]:
    return {
        "bus.jpg": bus_jpg,
        "astronaut": encode_image(skdata.astronaut()),
        "synthetic": encode_image(synthetic_scene(640, 480)),
    }


@pytest.fixture(scope="module")
def references(exact_client: TestClient, images: dict[str, bytes]) -> dict[str, tuple[SamPredictor, str]]:
    """A SamPredictor with the server's own model per image, and the server's image_id."""
    out = {}
    for name, data in images.items():
        predictor = SamPredictor(segmenter_of(exact_client).sam)
        with torch.inference_mode():
            predictor.set_image(decode_image(data, MAX))
        response = exact_client.post(
            "/v1/sam/mobile_sam/embed", content=data, headers={"content-type": "application/octet-stream"}
        )
        assert response.status_code == 200
        out[name] = (predictor, response.json()["image_id"])
    return out


def prompts_for(width: int, height: int) -> list[dict]:
    cx, cy = width * 0.45, height * 0.55
    return [
        {"points": [[cx, cy]]},
        {"points": [[cx, cy], [width * 0.2, height * 0.3]], "labels": [1, 0]},
        {"box": [width * 0.1, height * 0.2, width * 0.7, height * 0.9]},
        {"points": [[cx, cy]], "box": [width * 0.1, height * 0.2, width * 0.7, height * 0.9]},
        {"points": [[0, 0], [width, height]]},  # the image's corners are inside (pixel-edge coordinates)
    ]


def reference_predict(predictor: SamPredictor, prompt: dict, multimask: bool, mask_input=None):
    points = np.array(prompt["points"], np.float32) if prompt.get("points") else None
    labels = (
        np.array(prompt.get("labels", [1] * len(prompt.get("points", []))), np.int32)
        if points is not None
        else None
    )
    box = np.array(prompt["box"], np.float32) if "box" in prompt else None
    with torch.inference_mode():
        return predictor.predict(
            point_coords=points,
            point_labels=labels,
            box=box,
            mask_input=mask_input,
            multimask_output=multimask,
        )


@pytest.mark.parametrize("image", ["bus.jpg", "astronaut", "synthetic"])
def test_masks_and_scores_equal_sampredictor(
    exact_client: TestClient, references, images, image: str
) -> None:
    predictor, image_id = references[image]
    height, width = predictor.original_size
    for prompt in prompts_for(width, height):
        multimask = len(prompt.get("points", [])) == 1 and "box" not in prompt
        ref_masks, ref_scores, _ = reference_predict(predictor, prompt, multimask)
        response = exact_client.post(
            "/v1/sam/mobile_sam/segment",
            json={
                "image": {"base64": base64.b64encode(images[image]).decode()},
                **prompt,
                "max_masks": 3,
                "refine": False,
            },
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["image_id"] == image_id
        ours = masks_of(body)
        order = np.argsort(-ref_scores, kind="stable")
        assert len(ours) == len(order)
        for mask, mask_out, index in zip(ours, body["masks"], order, strict=True):
            assert abs(mask_out["score"] - float(ref_scores[index])) < 1e-3
            assert iou(mask, ref_masks[index]) >= 0.999, (image, prompt)
            assert mask_out["area"] == int(mask.sum())


def test_second_click_reuses_first_click_logits_like_sam_authors_recommend(
    exact_client: TestClient, references, images
):
    predictor, image_id = references["bus.jpg"]
    exact_client.post(
        "/v1/sam/mobile_sam/embed", content=images["bus.jpg"], headers={"content-type": "image/jpeg"}
    )
    first = {"points": [[400, 600]]}
    second = {"points": [[400, 600], [250, 300]], "labels": [1, 0]}
    _, scores, logits = reference_predict(predictor, first, multimask=True)
    ref_masks, ref_scores, _ = reference_predict(
        predictor, second, multimask=False, mask_input=logits[np.argmax(scores)][None]
    )
    r1 = exact_client.post("/v1/sam/mobile_sam/segment", json={"image_id": image_id, **first})
    assert r1.json()["refined_from_points"] is None
    r2 = exact_client.post("/v1/sam/mobile_sam/segment", json={"image_id": image_id, **second})
    body = r2.json()
    assert body["refined_from_points"] == 1
    assert abs(body["masks"][0]["score"] - float(ref_scores[0])) < 1e-3
    assert iou(masks_of(body)[0], ref_masks[0]) >= 0.999
    # Without refinement the answer is the plain decode, which differs.
    plain_masks, plain_scores, _ = reference_predict(predictor, second, multimask=False)
    r3 = exact_client.post(
        "/v1/sam/mobile_sam/segment", json={"image_id": image_id, **second, "refine": False}
    )
    assert abs(r3.json()["masks"][0]["score"] - float(plain_scores[0])) < 1e-3
    assert abs(float(plain_scores[0]) - float(ref_scores[0])) > 1e-4


@pytest.mark.parametrize("multimask", [False, True])
def test_boxes_in_one_batch_equal_predict_torch(exact_client: TestClient, references, multimask: bool):
    """`boxes`: one mask per box (its best when multimask), equal to SamPredictor.predict_torch's batch of
    boxes; 20 boxes, more than one decoder pass takes (16)."""
    predictor, image_id = references["bus.jpg"]
    height, width = predictor.original_size
    corners = np.random.default_rng(5).uniform(0, 1, (20, 2, 2)) * [width - 8, height - 8]
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1) + 8], axis=1).astype(np.float32)
    with torch.inference_mode():
        scaled = predictor.transform.apply_boxes_torch(torch.from_numpy(boxes), predictor.original_size)
        ref_masks, ref_scores, _ = predictor.predict_torch(None, None, scaled, multimask_output=multimask)
    body = exact_client.post(
        "/v1/sam/mobile_sam/segment",
        json={"image_id": image_id, "boxes": boxes.tolist(), "multimask_output": multimask},
    ).json()
    assert len(body["masks"]) == len(boxes)
    for i, (mask, out) in enumerate(zip(masks_of(body), body["masks"], strict=True)):
        best = int(np.argsort(-ref_scores[i].numpy(), kind="stable")[0])
        assert abs(out["score"] - float(ref_scores[i][best])) < 1e-3
        assert iou(mask, ref_masks[i][best].numpy()) >= 0.999, i


def test_default_fp16_cache_matches_reference(client: TestClient, references, images) -> None:
    predictor, _ = references["bus.jpg"]
    segmenter = segmenter_of(client)
    assert segmenter.sam is not None
    # Same seed, same architecture: the default app's model has the reference model's weights.
    ref_state = predictor.model.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in segmenter.sam.state_dict().items())
    response = client.post(
        "/v1/sam/mobile_sam/segment",
        json={
            "image": {"base64": base64.b64encode(images["bus.jpg"]).decode()},
            "points": [[400, 600]],
            "max_masks": 3,
        },
    )
    body = response.json()
    ref_masks, ref_scores, _ = reference_predict(predictor, {"points": [[400, 600]]}, multimask=True)
    order = np.argsort(-ref_scores, kind="stable")
    for mask, mask_out, index in zip(masks_of(body), body["masks"], order, strict=True):
        assert abs(mask_out["score"] - float(ref_scores[index])) < 1e-3
        assert iou(mask, ref_masks[index]) >= 0.999


@pytest.mark.parametrize("size", [(1080, 810), (3000, 4000), (480, 640), (12, 7), (100, 2000), (1024, 1024)])
def test_region_upsampling_equals_full_postprocess(exact_client: TestClient, size: tuple[int, int]) -> None:
    """Both upsampling paths (ROI-only on the CPU, full on a GPU) give SAM's postprocess_masks result."""
    segmenter = segmenter_of(exact_client)
    height, width = size
    scale = 1024 / max(height, width)
    input_size = (int(height * scale + 0.5), int(width * scale + 0.5))
    embedding = ImageEmbedding({"image_embed": torch.zeros(1)}, (height, width), input_size)
    generator = torch.Generator().manual_seed(height * 7 + width)
    smooth = torch.nn.functional.interpolate(
        torch.randn(4, 1, 16, 16, generator=generator), (256, 256), mode="bilinear", align_corners=False
    )[:, 0]
    cases = [smooth[0], smooth[1] - 1.0, smooth[2] + 3.0, -torch.ones(256, 256), smooth[3] - 1.5]
    for logits in cases:
        reference = segmenter.sam.postprocess_masks(logits[None, None], input_size, (height, width))[0, 0] > 0
        ours = segmenter.upsample(embedding, logits)
        assert iou(ours.to_full(), reference.numpy()) >= 0.999
        assert ours.to_full().shape == (height, width)
        # The GPU path (run here on the CPU) is postprocess_masks itself: exactly equal.
        assert np.array_equal(segmenter.upsample_full(embedding, logits).to_full(), reference.numpy())


def test_batched_encode_equals_one_by_one(exact_client: TestClient) -> None:
    """Encoder micro-batching: images of different sizes in one pass give each image's own embedding."""
    segmenter = segmenter_of(exact_client)
    images = [synthetic_scene(640, 480, seed=1), synthetic_scene(300, 500, seed=2), synthetic_scene(800, 200)]
    batched = segmenter.encode_batch(images)
    for image, embedding in zip(images, batched, strict=True):
        single = segmenter.encode(image)
        assert embedding.original_size == single.original_size and embedding.input_size == single.input_size
        ours, theirs = embedding["image_embed"].float(), single["image_embed"].float()
        error = (ours - theirs).norm() / theirs.norm()
        assert float(error) < 1e-4
