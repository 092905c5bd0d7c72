"""SAM 3 as a detector of a server-side vocabulary (label → phrases): CVAT's Nuclio detector function, the AI
agent's DetectionFunction, /v1/detect and jobs (the vocabulary in the job spec). Each answer is checked
against /v1/concepts on the same image (the path tests/test_sam3_equivalence.py checks against
transformers)."""

from __future__ import annotations

import base64
import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from cvat_cli._internal.common import FunctionLoader
from cvat_sdk.auto_annotation.driver import _AnnotationMapper, _DetectionFunctionContextImpl
from fastapi.testclient import TestClient
from pydantic import ValidationError

from models.sam3 import TINY_CONFIG, sam3_config
from models.shapes import RegionMask
from server.app import create_app
from server.formats.rle import cvat_rle_decode
from server.settings import Settings

from .conftest import make_settings, ultralytics_asset
from .server_process import ServerProcess
from .test_cvat_detector import AGENT, dataset_labels
from .test_cvat_nuclio import cvat_headers

MODEL = "sam3"
VOCABULARY = {"vehicle": ["bus", "car"], "someone": ["person"]}
THRESHOLD = 0.2505  # random weights score about 0.25: this keeps some of the 20 queries
BUS = ultralytics_asset("bus.jpg").read_bytes()
ZIDANE = ultralytics_asset("zidane.jpg").read_bytes()
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def client_with(tmp: Path, **settings: object) -> Iterator[TestClient]:
    sam3_config(TINY_CONFIG).save_pretrained(tmp / "weights" / MODEL)
    app = create_app(make_settings(tmp, models=[MODEL], data_dir=tmp / "data", **settings),
                     load_models_in_background=False)  # fmt: skip
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def masks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    yield from client_with(tmp_path_factory.mktemp("sam3-masks"), concept_vocabulary=VOCABULARY)


@pytest.fixture(scope="module")
def boxes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    yield from client_with(
        tmp_path_factory.mktemp("sam3-boxes"), concept_vocabulary=VOCABULARY, concept_output="box"
    )


def concepts(client: TestClient, data: bytes, phrases: list[str], threshold: float = THRESHOLD) -> dict:
    body = {"image": {"base64": base64.b64encode(data).decode()}, "text": phrases,
            "score_threshold": threshold, "max_instances": 300, "formats": ["cvat"]}  # fmt: skip
    response = client.post(f"/v1/concepts/{MODEL}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def box_iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def invoke(client: TestClient, data: bytes, threshold: float = THRESHOLD) -> list[dict]:
    payload = {"image": base64.b64encode(data).decode(), "threshold": threshold}
    reply = client.post("/api/function_invocations", json=payload, headers=cvat_headers("labelserve-sam3"))
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_the_nuclio_detector_declares_the_vocabulary(masks: TestClient, boxes: TestClient) -> None:
    for client, label_type in ((masks, "mask"), (boxes, "rectangle")):
        functions = client.get("/api/functions").json()
        function = functions["labelserve-sam3"]
        assert function["metadata"]["annotations"]["type"] == "detector"
        # The click head is an interactor of its own (tests/test_sam3_clicks.py invokes it).
        assert functions["labelserve-sam3-clicks"]["metadata"]["annotations"]["type"] == "interactor"
        spec = json.loads(function["metadata"]["annotations"]["spec"])
        assert [(label["name"], label["type"]) for label in spec] == [
            ("vehicle", label_type),
            ("someone", label_type),
        ]


def test_nuclio_masks_are_the_concepts_of_each_label(masks: TestClient) -> None:
    concept = masks.app.state.services.registry.concept(MODEL)
    calls = []
    hook = concept.model.vision_encoder.backbone.register_forward_hook(lambda *_: calls.append(1))
    try:
        items = invoke(masks, ZIDANE)
        again = invoke(masks, ZIDANE)
    finally:
        hook.remove()
    assert items == again and len(calls) == 1  # the frame's features were cached by the first call
    width, height = PIL.Image.open(io.BytesIO(ZIDANE)).size
    found = concepts(masks, ZIDANE, ["bus", "car", "person"])
    by_phrase: dict[str, list[dict]] = {}
    for instance in found["instances"]:
        by_phrase.setdefault(instance["prompt"], []).append(instance)

    someone = [i for i in items if i["label"] == "someone"]
    assert len(someone) == found["counts"]["person"] > 0
    for item, instance in zip(someone, by_phrase["person"], strict=True):
        assert item["type"] == "mask" and float(item["confidence"]) == pytest.approx(
            instance["score"], abs=1e-4
        )
        *bitmap, xtl, ytl, xbr, ybr = item["mask"]  # the detector reply's bitmap of the mask's box
        got = RegionMask(np.array(bitmap).reshape(ybr - ytl + 1, xbr - xtl + 1) > 0, xtl, ytl, width, height)
        want = cvat_rle_decode(instance["mask"]["cvat"], width, height)
        assert got == want and len(item["points"]) >= 6

    # "vehicle" is "bus" or "car": their instances, best first, less those overlapping (IoU > 0.7, the
    # detection IoU) a better one of the other phrase: one object found by both phrases is one vehicle.
    either = sorted(by_phrase.get("bus", []) + by_phrase.get("car", []), key=lambda i: -i["score"])
    kept: list[dict] = []
    for instance in either:
        if not any(
            k["prompt"] != instance["prompt"] and box_iou(k["box"], instance["box"]) > 0.7 for k in kept
        ):
            kept.append(instance)
    vehicle = [float(i["confidence"]) for i in items if i["label"] == "vehicle"]
    assert vehicle == pytest.approx([i["score"] for i in kept], abs=1e-4)
    assert 0 < len(kept) < len(either)  # both phrases found things, and some twice
    assert all(float(i["confidence"]) > THRESHOLD for i in items)


def test_nuclio_boxes_by_setting(boxes: TestClient) -> None:
    items = invoke(boxes, BUS)
    found = concepts(boxes, BUS, ["person"])
    someone = [i for i in items if i["label"] == "someone"]
    assert all(i["type"] == "rectangle" and "mask" not in i for i in items)
    got = np.array([i["points"] for i in someone]).reshape(-1, 4)
    np.testing.assert_allclose(
        got, np.array([i["box"] for i in found["instances"]]).reshape(-1, 4), atol=0.011
    )
    assert len(got) == found["counts"]["person"] > 0


def test_without_a_vocabulary_sam3_is_no_detector(tmp_path: Path) -> None:
    for client in client_with(tmp_path):
        assert "labelserve-sam3" not in client.get("/api/functions").json()
        body = {"image": {"base64": base64.b64encode(BUS).decode()}}
        refused = client.post(f"/v1/detect/{MODEL}", json=body)
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "no_vocabulary"
        job = {"source": {"directory": str(tmp_path)}, "detector": MODEL,
               "output": {"format": "coco", "directory": str(tmp_path / "out")}}  # fmt: skip
        refused = client.post("/v1/jobs", json=job)
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "no_vocabulary"


def test_the_vocabulary_file(tmp_path: Path) -> None:
    path = tmp_path / "vocabulary.yaml"
    path.write_text("car:\n  - car\n  - van\nperson: []\nbus: yellow bus\n")
    settings = Settings(concept_vocabulary_file=path)
    assert settings.models_config().concept_vocabulary == {
        "car": ["car", "van"],
        "person": ["person"],
        "bus": ["yellow bus"],
    }
    for text in ("- car\n", "car: ['']\n", f"car: ['{'x' * 201}']\n"):
        path.write_text(text)
        with pytest.raises(ValidationError):
            Settings(concept_vocabulary_file=path)
    with pytest.raises(ValidationError, match="not both"):
        Settings(concept_vocabulary_file=path, concept_vocabulary={"car": ["car"]})


def test_a_job_finds_the_vocabulary_of_its_spec(masks: TestClient, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "bus.jpg").write_bytes(BUS)
    (images / "zidane.jpg").write_bytes(ZIDANE)
    job = {
        "source": {"directory": str(images)},
        "detector": MODEL,
        "vocabulary": {"human": ["person"], "coach": ["bus"]},  # not the server's vocabulary
        "params": {"conf": THRESHOLD},
        "output": {"format": "coco", "directory": str(tmp_path / "out")},
    }
    submitted = masks.post("/v1/jobs", json=job)
    assert submitted.status_code in (200, 201, 202), submitted.text
    job_id = submitted.json()["id"]
    for _ in range(600):
        status = masks.get(f"/v1/jobs/{job_id}").json()
        if status["state"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert status["state"] == "completed", status
    coco = json.loads((tmp_path / "out" / "annotations.json").read_text())
    categories = {c["id"]: c["name"] for c in coco["categories"]}
    assert sorted(categories.values()) == ["coach", "human"]
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    for file_name, data in (("bus.jpg", BUS), ("zidane.jpg", ZIDANE)):
        found = concepts(masks, data, ["person", "bus"])
        counted = {"human": 0, "coach": 0}
        for annotation in coco["annotations"]:
            if names[annotation["image_id"]] == file_name:
                counted[categories[annotation["category_id"]]] += 1
        assert counted == {"human": found["counts"]["person"], "coach": found["counts"]["bus"]}
    assert sum(1 for _ in coco["annotations"]) > 0

    wrong = masks.post("/v1/jobs", json=job | {"vocabulary": {"human": [""]}})
    assert wrong.status_code == 422 and wrong.json()["error"]["code"] == "bad_vocabulary"


@pytest.fixture(scope="module")
def live_sam3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("live-sam3")
    sam3_config(TINY_CONFIG).save_pretrained(tmp / "weights" / MODEL)
    env = {
        "LABELSERVE_WEIGHTS_DIR": str(tmp / "weights"),
        "LABELSERVE_MODELS": MODEL,
        "LABELSERVE_DATA_DIR": str(tmp / "data"),
        "LABELSERVE_CONCEPT_VOCABULARY": json.dumps(VOCABULARY),
    }
    with ServerProcess(env, tmp / "server.log", random_init=True) as server:
        yield server.url


def test_the_agent_detection_function_passes_cvat_sdk_validation(live_sam3: str) -> None:
    function = FunctionLoader(
        function_module=None, function_file=AGENT, function_parameters={"url": live_sam3, "model": MODEL}
    ).load()
    assert [label.name for label in function.spec.labels] == ["vehicle", "someone"]
    context = _DetectionFunctionContextImpl(
        frame_name="f.jpg", conf_threshold=THRESHOLD, conv_mask_to_poly=False
    )
    annotations = function.detect(context, PIL.Image.open(io.BytesIO(ZIDANE)))
    assert annotations
    mapper = _AnnotationMapper(
        logging.getLogger("test"),
        function.spec.labels,
        dataset_labels(function.spec.labels),
        allow_unmatched_labels=False,
        conv_mask_to_poly=False,
    )
    tags, shapes = mapper.validate_and_remap(annotations, ds_frame=2)
    assert not tags and len(shapes) == len(annotations)
    assert all(shape.type.value == "mask" and shape.frame == 2 for shape in shapes)
    assert np.all([shape.label_id >= 100 for shape in shapes])
