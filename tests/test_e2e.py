"""labelserve as users run it: `labelserve serve` in its own process, called over HTTP on loopback."""

from __future__ import annotations

import base64

import httpx

from .conftest import encode_image, synthetic_scene


def test_embed_then_clicks_over_http(live_server: str) -> None:
    image = encode_image(synthetic_scene(800, 600, seed=5), "JPEG", quality=90)
    with httpx.Client(base_url=live_server, timeout=60) as http:
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


def test_cvat_lambda_manager_replay_over_http(live_server: str) -> None:
    """What CVAT's LambdaGateway does in dashboard mode: list, get, then invoke with Nuclio headers."""
    frame = base64.b64encode(encode_image(synthetic_scene(640, 480, seed=6), "JPEG", quality=92)).decode()
    headers = {
        "x-nuclio-project-name": "cvat",
        "x-nuclio-function-namespace": "nuclio",
        "x-nuclio-invoke-via": "domain-name",
        "X-Nuclio-Invoke-Timeout": "120s",
    }
    with httpx.Client(base_url=live_server, timeout=120, headers=headers) as cvat:
        functions = cvat.get("/api/functions").json()
        interactors = [f for f in functions.values() if f["metadata"]["annotations"]["type"] == "interactor"]
        function_id = interactors[0]["metadata"]["name"]
        assert cvat.get(f"/api/functions/{function_id}").status_code == 200
        invoke = {"x-nuclio-function-name": function_id, "x-nuclio-path": "/"}
        clicks = [([[200, 240]], []), ([[200, 240]], [[500, 100]]), ([[200, 240], [260, 250]], [[500, 100]])]
        for pos, neg in clicks:  # the UI sends every click so far, and the whole frame, each time
            reply = cvat.post(
                "/api/function_invocations",
                headers=invoke,
                json={"image": frame, "pos_points": pos, "neg_points": neg, "obj_bbox": []},
            )
            assert reply.status_code == 200
            *runs, xtl, ytl, xbr, ybr = reply.json()["shapes"][0]["points"]
            assert sum(runs) == (xbr - xtl + 1) * (ybr - ytl + 1)
        stats = cvat.get("/v1/cache/stats").json()
        assert stats["refinement"]["reused"] >= 2  # later clicks started from the earlier clicks' logits
