"""SAM 2 tracker: Meta's reference propagation reproduced with a bounded memory bank, the tracker protocol
on a synthetic video, and bad inputs. Random weights (no checkpoint is obtainable here) at a 256-pixel model
input, so a frame costs a fraction of a second on the CPU; the plumbing is the same at 1024.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.base import ImageEmbedding
from models.registry import ModelRegistry
from models.sam2 import Sam2Segmenter
from models.sam2_tracker import Sam2State, Sam2Tracker, build_sam2
from models.shapes import Keypoint, RegionMask, Shape
from models.tracker import Frame, TrackerInputError

from .conftest import make_settings
from .synthetic_video import SyntheticVideo

IMAGE_SIZE = 256
SEED = 7


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    model = build_sam2("sam2.1_hiera_tiny", None, torch.device("cpu"), image_size=IMAGE_SIZE)
    # With random weights SAM 2 mostly scores the object absent, and then every output is a constant (empty
    # mask, the learned no-object pointer) that no longer depends on the memory bank. A large object-score
    # bias keeps the object present, so a wrong memory bank shows in the masks.
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += 10.0
    return model


@pytest.fixture
def tracker(model: torch.nn.Module) -> Sam2Tracker:
    return Sam2Tracker("sam2.1_hiera_tiny", model)


def frame(image: np.ndarray, t: int) -> Frame:
    return Frame(image, f"frame-{t}")


def box_shape(box: tuple[float, float, float, float]) -> Shape:
    return Shape("box", box=tuple(float(v) for v in box))


# ---- equivalence with the reference video predictor ------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*cannot import name '_C'.*:UserWarning")
@pytest.mark.parametrize(("prompt", "tracked"), [("box", 8), ("mask", 3)])
def test_matches_reference_propagation(
    model: torch.nn.Module, tmp_path: Path, prompt: str, tracked: int
) -> None:
    """Frame by frame, the bounded tracker gives the masks, memories and object pointers that Meta's
    SAM2VideoPredictor.propagate_in_video gives with the whole video in memory, also once the tracker has
    forgotten frames (8 frames > 1 prompted + 6 recent memories)."""
    video = SyntheticVideo(width=320, height=180, frames=16, seed=3)
    for t in range(video.frames):  # JPEG: the reference reads a folder of them
        Image.fromarray(video.frame(t)[0]).save(tmp_path / f"{t:05d}.jpg", quality=95)
    images = [np.asarray(Image.open(tmp_path / f"{t:05d}.jpg").convert("RGB")) for t in range(video.frames)]
    box = video.frame(0)[1][0]
    assert box is not None

    with torch.inference_mode():
        reference = model.init_state(video_path=str(tmp_path))
        if prompt == "box":
            model.add_new_points_or_box(reference, frame_idx=0, obj_id=1, box=np.array(box, np.float32))
            shape = box_shape(box)
        else:
            full = np.zeros((video.height, video.width), bool)
            x1, y1, x2, y2 = (int(v) for v in box)
            full[y1:y2, x1:x2] = True
            model.add_new_mask(reference, frame_idx=0, obj_id=1, mask=full)
            shape = Shape("mask", mask=RegionMask.from_full(full))
        expected = {
            t: (masks[0, 0] > 0).numpy()
            for t, _, masks in model.propagate_in_video(reference, max_frame_num_to_track=tracked - 1)
        }
    assert sorted(expected) == list(range(tracked))
    assert all(expected[t].any() for t in range(tracked))  # present everywhere: outputs depend on memory
    outputs = reference["output_dict_per_obj"][0]

    tracker = Sam2Tracker("sam2.1_hiera_tiny", model)
    state = tracker.init(frame(images[0], 0), shape)
    assert torch.equal(state.conditioning.features, outputs["cond_frame_outputs"][0]["maskmem_features"])
    assert torch.equal(state.conditioning.pointer, outputs["cond_frame_outputs"][0]["obj_ptr"])
    for t in range(1, tracked):
        result = tracker.step(state, frame(images[t], t))
        got = np.zeros_like(expected[t]) if result is None else result.mask.to_full()
        assert np.array_equal(got, expected[t]), f"frame {t}"
        assert torch.equal(state.recent[t].pointer, outputs["non_cond_frame_outputs"][t]["obj_ptr"])
        assert torch.equal(state.recent[t].features, outputs["non_cond_frame_outputs"][t]["maskmem_features"])
    kept = [t for t, m in state.recent.items() if m.features is not None]
    assert list(state.recent) == list(range(1, tracked)) and kept == list(range(max(tracked - 6, 1), tracked))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.mark.filterwarnings("ignore:.*cannot import name '_C'.*:UserWarning")
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_tracker_on_click_embeddings_matches_reference(
    model: torch.nn.Module, tmp_path: Path, cache_dtype: torch.dtype
) -> None:
    """Tracking on the click path's cached embeddings (one encode per frame serves clicks and tracking) gives
    the reference propagation's masks when the reference reads the frames preprocessed as the clicks
    preprocess them (SAM2Transforms): exactly from float32 embeddings, IoU ≥ 0.999 from float16 ones."""
    # 16 frames, as above: the reference scales its object pointers' positions by the video's length (up to
    # 16), which the streaming tracker takes as "at least 16"
    video, tracked = SyntheticVideo(width=320, height=180, frames=16, seed=3), 8
    for t in range(video.frames):
        Image.fromarray(video.frame(t)[0]).save(tmp_path / f"{t:05d}.jpg", quality=95)
    images = [np.asarray(Image.open(tmp_path / f"{t:05d}.jpg").convert("RGB")) for t in range(video.frames)]
    box = video.frame(0)[1][0]
    assert box is not None
    segmenter = Sam2Segmenter("sam2.1_hiera_tiny", "sam2.1_hiera_tiny", model, cache_dtype=cache_dtype)
    with torch.inference_mode():
        reference = model.init_state(video_path=str(tmp_path))
        reference["images"] = torch.stack([segmenter.prepare(image).image for image in images])
        reference["cached_features"] = {}  # init_state encoded frame 0 from its own frames
        model.add_new_points_or_box(reference, frame_idx=0, obj_id=1, box=np.array(box, np.float32))
        expected = {
            t: (masks[0, 0] > 0).numpy()
            for t, _, masks in model.propagate_in_video(reference, max_frame_num_to_track=tracked - 1)
        }
    assert all(expected[t].any() for t in range(tracked))

    encoded: list[str] = []

    def embed(f: Frame) -> ImageEmbedding:
        encoded.append(f.content_id)
        return segmenter.encode(f.image)

    tracker = Sam2Tracker("sam2.1_hiera_tiny", model).on_embeddings(embed)
    state = tracker.init(frame(images[0], 0), box_shape(box))
    worst = 1.0
    for t in range(1, tracked):
        result = tracker.step(state, frame(images[t], t))
        got = np.zeros_like(expected[t]) if result is None else result.mask.to_full()
        if cache_dtype == torch.float32:
            assert np.array_equal(got, expected[t]), f"frame {t}"
        worst = min(worst, iou(got, expected[t]))
    assert worst >= 0.999, worst  # float16: 0.99988 at worst here
    assert encoded == [f"frame-{t}" for t in range(tracked)]  # through `embed` only, once per frame


# ---- the tracker protocol and bounded memory --------------------------------------------------------------
def test_tracks_a_video_with_bounded_memory(tracker: Sam2Tracker) -> None:
    """60 frames of an object that leaves the frame: every step answers a mask or None, and the state holds
    as many bytes after 60 frames as after 20 (1 prompted + 6 recent memories, 15 recent object pointers)."""
    video = SyntheticVideo(width=320, height=180, frames=60, seed=1)
    image, boxes = video.frame(0)
    leaving = boxes[2]  # the blue rectangle: out of the frame by about frame 45
    assert leaving is not None and video.frame(59)[1][2] is None
    state = tracker.init(frame(image, 0), box_shape(leaving))
    assert isinstance(state, Sam2State) and state.recent == {}
    sizes, found = {}, 0
    for t in range(1, video.frames):
        result = tracker.step(state, frame(video.frame(t)[0], t))
        if result is not None:
            found += 1
            assert result.kind == "mask" and isinstance(result.mask, RegionMask)
            assert (result.mask.image_width, result.mask.image_height) == (video.width, video.height)
            assert result.mask.bbox_xyxy_inclusive() is not None and 0.0 <= result.score <= 1.0
        if t in (20, 59):
            sizes[t] = tracker.state_bytes(state)
            assert len(state.recent) == 15
            assert sum(m.features is not None for m in state.recent.values()) == 6
    assert found > 0 and sizes[20] == sizes[59]
    # No frame is kept: 7 memories of [1, 64, 16, 16] bfloat16 and 16 pointers of [1, 256] float32.
    assert sizes[59] == 7 * 64 * 16 * 16 * 2 + 16 * 256 * 4 + 512


def test_fewer_memory_frames_keep_fewer_memories(model: torch.nn.Module) -> None:
    tracker = Sam2Tracker("sam2.1_hiera_tiny", model, memory_frames=2)
    video = SyntheticVideo(width=320, height=180, frames=5, seed=1)
    image, boxes = video.frame(0)
    state = tracker.init(frame(image, 0), box_shape(boxes[0]))
    for t in range(1, video.frames):
        tracker.step(state, frame(video.frame(t)[0], t))
    assert [t for t, m in state.recent.items() if m.features is not None] == [3, 4]
    assert list(state.recent) == [1, 2, 3, 4]  # older frames still lend their object pointers
    with pytest.raises(ValueError, match="memory_frames"):
        Sam2Tracker("sam2.1_hiera_tiny", model, memory_frames=7)


@pytest.mark.parametrize("kind", ["polygon", "mask"])
def test_regions_prompt_with_their_exact_pixels(tracker: Sam2Tracker, kind: str) -> None:
    """A polygon or mask is SAM 2's mask input, which it takes as the object's mask on the prompted frame."""
    video = SyntheticVideo(width=320, height=180, frames=3, seed=2)
    image, boxes = video.frame(0)
    x1, y1, x2, y2 = boxes[0]
    if kind == "polygon":
        shape = Shape("polygon", label="car", polygon=[x1, y1, x2, y1, x2, y2, x1, y2])
    else:
        full = np.zeros((video.height, video.width), bool)
        full[int(y1) : int(y2), int(x1) : int(x2)] = True
        shape = Shape("mask", label="car", mask=RegionMask.from_full(full))
    state = tracker.init(frame(image, 0), shape)
    assert state.label == "car" and state.conditioning.features is not None
    for t in (1, 2):
        result = tracker.step(state, frame(video.frame(t)[0], t))
        assert result is None or (result.kind == "mask" and result.label == "car")
    assert state.frame_index == 2


# ---- bad input --------------------------------------------------------------------------------------------
def test_bad_shapes_are_refused(tracker: Sam2Tracker) -> None:
    image = SyntheticVideo(width=160, height=90, frames=1).frame(0)[0]
    first = frame(image, 0)
    bad = [
        box_shape((10, 10, 10, 40)),  # no area
        box_shape((200, 100, 260, 140)),  # entirely outside the frame
        Shape("polygon", polygon=[300.0, 300.0, 320.0, 300.0, 310.0, 320.0]),  # outside the frame
        Shape("mask", mask=RegionMask.empty(160, 90)),
        Shape("mask", mask=RegionMask.from_full(np.ones((90, 150), bool))),  # another frame size
        Shape("keypoints", keypoints=[Keypoint("nose", 5.0, 5.0)]),
        Shape("tag"),
    ]
    for shape in bad:
        with pytest.raises(TrackerInputError):
            tracker.init(first, shape)


def test_bad_frames_are_refused(tracker: Sam2Tracker) -> None:
    video = SyntheticVideo(width=160, height=90, frames=1)
    image, boxes = video.frame(0)
    state = tracker.init(frame(image, 0), box_shape(boxes[0]))
    with pytest.raises(TrackerInputError, match="differs"):
        tracker.step(state, frame(np.zeros((100, 160, 3), np.uint8), 1))
    with pytest.raises(TrackerInputError):
        tracker.step(state, frame(np.zeros((90, 160), np.uint8), 1))
    with pytest.raises(TrackerInputError):
        tracker.init(frame(image.astype(np.float32), 0), box_shape(boxes[0]))
    assert state.frame_index == 0 and state.recent == {}  # a refused frame changes nothing


# ---- registry and checkpoints -----------------------------------------------------------------------------
def test_registry_loads_a_manifest_tracker(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, models=["sam2.1_hiera_tiny"], sam2_memory_frames=4)
    registry = ModelRegistry(settings)
    registry.load_enabled()
    record = registry.record("sam2.1_hiera_tiny")
    assert record.kinds == ("segmenter", "tracker") and record.state == "loaded"
    assert record.weights == "random-init"
    tracker = registry.tracker("sam2.1_hiera_tiny")
    assert isinstance(tracker, Sam2Tracker) and tracker.memory_frames == 4 and tracker.size == 1024
    segmenter = registry.segmenter("sam2.1_hiera_tiny")
    assert isinstance(segmenter, Sam2Segmenter) and segmenter.model is tracker.model  # one set of weights
    described = {r["name"]: r for r in registry.describe()}["sam2_hiera_large"]
    assert (described["kind"], described["kinds"]) == ("segmenter", ["segmenter", "tracker"])


def test_checkpoint_in_meta_layout_loads(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    torch.manual_seed(SEED + 1)  # other random weights, overwritten by the checkpoint
    loaded = build_sam2("sam2.1_hiera_tiny", path, torch.device("cpu"), image_size=IMAGE_SIZE).state_dict()
    expected = model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_sam2_over_the_tracking_api_and_cvat(tmp_path: Path) -> None:
    """A loaded SAM 2 model is a tracker of /v1/track and a CVAT tracker function like the others, and its
    tracking and its clicks share one embedding per frame."""
    import base64
    import gc
    import hashlib
    import time
    import weakref

    from fastapi.testclient import TestClient

    from server.app import create_app

    from .conftest import encode_image
    from .synthetic_video import SyntheticVideo

    app = create_app(make_settings(tmp_path, models=["sam2.1_hiera_tiny"]), load_models_in_background=False)
    with TestClient(app) as client:
        trackers = {t["name"]: t["accepts"] for t in client.get("/v1/trackers").json()["trackers"]}
        assert "sam2.1_hiera_tiny" in trackers
        functions = client.get("/api/functions").json()
        assert functions["labelserve-track-sam2.1-hiera-tiny"]["metadata"]["annotations"]["type"] == "tracker"
        assert functions["labelserve-sam2.1-hiera-tiny"]["metadata"]["annotations"]["type"] == "interactor"
        video = SyntheticVideo(frames=3, width=320, height=240)
        image, truth = video.frame(0)
        frame = base64.b64encode(encode_image(image)).decode()
        started = client.post("/v1/track/sam2.1_hiera_tiny", json={
            "image": {"base64": frame}, "shapes": [{"type": "rectangle", "points": list(truth[0])}],
        })  # fmt: skip
        assert started.status_code == 200, started.text
        following = base64.b64encode(encode_image(video.frame(1)[0])).decode()
        body = {"image": {"base64": following}, "states": started.json()["states"]}
        step = client.post("/v1/track/sam2.1_hiera_tiny/step", json=body)
        assert step.status_code == 200, step.text
        (shape,) = step.json()["shapes"]
        assert shape is None or shape["type"] == "rectangle"  # random weights: the object may be lost
        # Tracking encoded each frame once, into the clicks' cache: a click on the second frame is an L1 hit.
        image_id = hashlib.sha256(base64.b64decode(following)).hexdigest()
        click = {"image_id": image_id, "points": [[50, 50]]}
        clicked = client.post("/v1/sam/sam2.1_hiera_tiny/segment", json=click)
        assert clicked.status_code == 200 and clicked.json()["cache_tier"] == "l1"
        encoders = client.get("/v1/cache/stats").json()["encoders"]
        assert encoders["sam2.1_hiera_tiny"]["done"]["interactive"] == 2
        # Unloading drops both faces: the embeddings, the tracking state, and the one model behind them.
        weights = weakref.ref(client.app.state.services.registry.segmenter("sam2.1_hiera_tiny").model)
        unloaded = client.post("/v1/models/sam2.1_hiera_tiny/unload")
        assert unloaded.status_code == 200, unloaded.text
        dropped = unloaded.json()["dropped"]
        assert dropped["embeddings"] == 2 and dropped["track_states"] == 1
        stepped = client.post("/v1/track/sam2.1_hiera_tiny/step", json=body)
        assert stepped.status_code == 503 and stepped.json()["error"]["code"] == "model_unavailable"
        for _ in range(200):  # the encoder thread lets go of the model once its queue is empty
            gc.collect()
            if weights() is None:
                break
            time.sleep(0.05)
        assert weights() is None, "something still holds the unloaded SAM 2 model"
