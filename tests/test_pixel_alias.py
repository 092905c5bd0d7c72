"""One picture in other bytes finds its embedding: a frame prefetched from its original JPEG and then sent as
a PNG (what CVAT's AI agent uploads) is one decode and no encode, with the masks of the original."""

from __future__ import annotations

import io

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from .conftest import encode_image, synthetic_scene


def png_of(jpeg: bytes) -> bytes:
    """What the agent sends: the decoded frame re-encoded losslessly."""
    return encode_image(np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")), "PNG", compress_level=1)


def embed(client: TestClient, data: bytes, kind: str) -> dict:
    reply = client.post("/v1/sam/mobile_sam/embed", content=data, headers={"content-type": f"image/{kind}"})
    assert reply.status_code == 200, reply.text
    return {**reply.json(), "timing": reply.headers["server-timing"]}


def test_png_of_a_prefetched_jpeg_reuses_its_embedding(client: TestClient) -> None:
    jpeg = encode_image(synthetic_scene(400, 300, seed=901), "JPEG", quality=90)
    first = embed(client, jpeg, "jpeg")
    second = embed(client, png_of(jpeg), "png")
    assert first["cache_tier"] == "encode"
    assert second["image_id"] != first["image_id"]  # other bytes...
    assert second["cache_tier"] == "l1" and "encode" not in second["timing"]  # ...the same pixels
    assert "pixel_id" in second["timing"]
    click = {"points": [[120, 150]], "refine": False}
    masks = [
        client.post("/v1/sam/mobile_sam/segment", json={"image_id": e["image_id"], **click}).json()["masks"]
        for e in (first, second)
    ]
    assert masks[0] == masks[1]


def test_other_pixels_are_encoded(client: TestClient) -> None:
    image = synthetic_scene(400, 300, seed=902)
    embed(client, encode_image(image), "png")
    image[0, 0] ^= 1  # one channel of one pixel
    assert embed(client, encode_image(image), "png")["cache_tier"] == "encode"
