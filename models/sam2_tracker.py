"""SAM 2 video tracking with a bounded memory bank, one object per state.

Meta's reference `SAM2VideoPredictor` keeps every frame of the video (and every frame's memory) in its
inference state. This tracker drives the same model one frame at a time through `SAM2Base.track_step` and
keeps only what that step can read: the conditioning frame's memory, the memories of the last few frames
(SAM 2 reads `num_maskmem - 1` = 6) and the object pointers of the last `max_obj_ptrs_in_encoder - 1` = 15
frames. So a state's size does not grow with the video, and for the same frames and prompt its masks are the
reference's (tests/test_sam2_tracker.py checks that against `propagate_in_video`).

A tracker made by `on_embeddings` reads each frame's features from the click path's cached embedding instead
of encoding the frame itself (models/sam2.py: the same backbone levels), so a frame that is clicked on and
tracked through, or prefetched, is encoded once. Its frames are then preprocessed as SAM2ImagePredictor
preprocesses images (a bilinear, antialiased stretch) rather than as the video predictor loads frames (PIL's
bicubic resize), and its features have the cache's precision.
"""

from __future__ import annotations

import copy
import importlib.util
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.base import ImageEmbedding
from models.sam2 import SAM2_CONFIGS, TENSORS
from models.shapes import RegionMask, Shape, mask_from_polygon
from models.tracker import Frame, Tracker, TrackerInputError

Embed = Callable[[Frame], ImageEmbedding]  # a frame's embedding by a Sam2Segmenter of the same model

# ImageNet statistics, as sam2.utils.misc.load_video_frames normalises frames.
_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
# uint8 -> [0, 1] exactly as the reference computes it (float64 division, then float32).
_UNIT = torch.from_numpy(np.arange(256) / 255.0).float()
# The stream's length is unknown; the reference clamps its pointer count by the video length, so this reads
# as "a video of at least max_obj_ptrs_in_encoder frames".
_UNBOUNDED_FRAMES = 1 << 31
# The reference's hole filling needs sam2's optional CUDA extension; without it, the reference skips it too.
_HOLE_FILLING = importlib.util.find_spec("sam2._C") is not None
_CACHED_FRAMES = 2  # several objects on one frame share one encoder pass


def build_sam2(
    architecture: str, checkpoint: Path | None, device: torch.device, image_size: int | None = None
) -> torch.nn.Module:
    """Meta's SAM2VideoPredictor model (random weights without a checkpoint); `image_size` overrides 1024."""
    from sam2.build_sam import build_sam2_video_predictor

    if architecture not in SAM2_CONFIGS:
        raise ValueError(f"unknown SAM 2 architecture {architecture!r}; known: {sorted(SAM2_CONFIGS)}")
    overrides = [f"++model.image_size={image_size}"] if image_size else []
    model = build_sam2_video_predictor(
        SAM2_CONFIGS[architecture], None, device=str(device), hydra_overrides_extra=overrides
    )
    if checkpoint is not None:
        # Meta's layout {"model": state_dict}; weights_only refuses pickled code.
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state), strict=True)
    return model.eval()


@dataclass
class _Features:
    vision_feats: list[torch.Tensor]
    vision_pos_embeds: list[torch.Tensor]
    feat_sizes: list[tuple[int, int]]


@dataclass
class _Memory:
    """What later frames read of one frame: its memory features (dropped once too old) and object pointer."""

    features: torch.Tensor | None  # [1, 64, h, w] bfloat16, as the reference stores them
    pointer: torch.Tensor  # [1, 256]


@dataclass
class Sam2State:
    size: tuple[int, int]  # (height, width) of the video
    label: str | None
    conditioning: _Memory  # the prompted frame, index 0
    recent: OrderedDict[int, _Memory] = field(default_factory=OrderedDict)  # frame index -> memory
    frame_index: int = 0


class Sam2Tracker(Tracker):
    accepts = ("box", "polygon", "mask")

    def __init__(self, name: str, model: torch.nn.Module, memory_frames: int | None = None) -> None:
        self.name = name
        self.model = model
        self.device = model.device
        self.size = int(model.image_size)
        most = model.num_maskmem - 1
        self.memory_frames = most if memory_frames is None else memory_frames
        if not 1 <= self.memory_frames <= most:
            raise ValueError(f"memory_frames must be 1..{most} (SAM 2 reads {most} recent frames)")
        self.pointer_frames = model.max_obj_ptrs_in_encoder - 1
        self._lock = threading.Lock()  # one model, shared by every state; parallel steps only fight for cores
        self._cache: OrderedDict[str, _Features] = OrderedDict()
        self._maskmem_pos_enc: list[torch.Tensor] | None = None  # the same for every frame and object
        self._embed: Embed | None = None
        self._vision_pos: list[torch.Tensor] | None = None  # likewise, for features read from embeddings

    def on_embeddings(self, embed: Embed) -> Sam2Tracker:
        """This tracker (same model, lock and settings) taking each frame's features from `embed`."""
        view = copy.copy(self)
        view._embed, view._cache = embed, OrderedDict()
        return view

    # ---- the Tracker interface ----------------------------------------------------------------------------
    def init(self, frame: Frame, shape: Shape) -> Sam2State:
        height, width = _check_frame(frame)
        points, mask = self._prompt(shape, width, height)
        features = self._features(frame)
        with self._lock, torch.inference_mode():
            out = self.model.track_step(
                frame_idx=0,
                is_init_cond_frame=True,
                current_vision_feats=features.vision_feats,
                current_vision_pos_embeds=features.vision_pos_embeds,
                feat_sizes=features.feat_sizes,
                point_inputs=points,
                mask_inputs=mask,
                output_dict={"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
                num_frames=_UNBOUNDED_FRAMES,
                run_mem_encoder=False,
            )
            # As propagate_in_video_preflight: a prompted frame's memory is encoded from its (hole-filled)
            # low-resolution mask, binarised.
            logits = self._fill_holes(out["pred_masks"])
            high_res = F.interpolate(logits, (self.size, self.size), mode="bilinear", align_corners=False)
            memory, pos_enc = self.model._encode_new_memory(
                current_vision_feats=features.vision_feats,
                feat_sizes=features.feat_sizes,
                pred_masks_high_res=high_res,
                object_score_logits=out["object_score_logits"],
                is_mask_from_pts=True,
            )
            self._keep_pos_enc(pos_enc)
            conditioning = _Memory(memory.to(torch.bfloat16), out["obj_ptr"])
        return Sam2State((height, width), shape.label, conditioning)

    def step(self, state: Sam2State, frame: Frame) -> Shape | None:
        if _check_frame(frame) != state.size:
            raise TrackerInputError(
                f"frame size {frame.size[1]}x{frame.size[0]} differs from the tracked video's "
                f"{state.size[1]}x{state.size[0]}; start a new track for another video"
            )
        index = state.frame_index + 1
        features = self._features(frame)
        with self._lock, torch.inference_mode():
            out = self.model.track_step(
                frame_idx=index,
                is_init_cond_frame=False,
                current_vision_feats=features.vision_feats,
                current_vision_pos_embeds=features.vision_pos_embeds,
                feat_sizes=features.feat_sizes,
                point_inputs=None,
                mask_inputs=None,
                output_dict=self._memory_bank(state, index),
                num_frames=_UNBOUNDED_FRAMES,
                run_mem_encoder=True,
            )
            self._keep_pos_enc(out["maskmem_pos_enc"])
            state.recent[index] = _Memory(out["maskmem_features"].to(torch.bfloat16), out["obj_ptr"])
            state.frame_index = index
            self._forget(state)
            height, width = state.size
            logits = self._fill_holes(out["pred_masks"])
            full = F.interpolate(logits, (height, width), mode="bilinear", align_corners=False)[0, 0] > 0
            score = float(torch.sigmoid(out["object_score_logits"]).flatten()[0])
            bitmap = full.cpu().numpy()
        if not bitmap.any():
            return None  # SAM 2 predicts the object absent (occluded or gone): its mask is empty
        tight = RegionMask.from_full(bitmap).tight()
        # A copy, so the shape does not keep the whole frame-sized bitmap alive.
        mask = RegionMask(tight.bitmap.copy(), tight.x0, tight.y0, width, height)
        return Shape("mask", label=state.label, score=score, mask=mask)

    def state_bytes(self, state: Sam2State) -> int:
        return sum(_tensor_bytes(m) for m in (state.conditioning, *state.recent.values())) + 512

    # ---- memory bank --------------------------------------------------------------------------------------
    def _memory_bank(self, state: Sam2State, index: int) -> dict[str, dict]:
        """The `output_dict` track_step reads for frame `index`, built from what the state kept."""
        pos_enc = self._maskmem_pos_enc
        window = index - (self.model.num_maskmem - 1)  # older frames only lend their object pointers
        recent = {
            t: {"maskmem_features": m.features, "maskmem_pos_enc": pos_enc, "obj_ptr": m.pointer}
            for t, m in state.recent.items()
            # a frame inside the memory window whose features were dropped (memory_frames < 6) is left out
            # whole: track_step would read features it no longer has
            if m.features is not None or t < window
        }
        cond = state.conditioning
        return {
            "cond_frame_outputs": {
                0: {"maskmem_features": cond.features, "maskmem_pos_enc": pos_enc, "obj_ptr": cond.pointer}
            },
            "non_cond_frame_outputs": recent,
        }

    def _forget(self, state: Sam2State) -> None:
        """Drop what no later step can read: the bound on memory."""
        newest = state.frame_index
        for t in list(state.recent):
            if t <= newest - self.pointer_frames:
                del state.recent[t]
            elif t <= newest - self.memory_frames:
                state.recent[t].features = None

    def _keep_pos_enc(self, pos_enc: list[torch.Tensor]) -> None:
        if self._maskmem_pos_enc is None:
            self._maskmem_pos_enc = [x[0:1].clone() for x in pos_enc]

    # ---- inputs -------------------------------------------------------------------------------------------
    def _prompt(self, shape: Shape, width: int, height: int) -> tuple[dict | None, torch.Tensor | None]:
        """SAM 2's prompt for `shape`: a box as two corner points (labels 2, 3), a region as a mask input."""
        if shape.kind == "box" and shape.box is not None:
            box = np.clip(np.array(shape.box, np.float32), 0, [width, height, width, height])
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                raise TrackerInputError("the box to track is empty inside the frame")
            # add_new_points_or_box: normalised by the video size, scaled to the model's input size.
            scale = torch.tensor([width, height], dtype=torch.float32)
            corners = torch.from_numpy(box).reshape(1, 2, 2) / scale * self.size
            labels = torch.tensor([[2, 3]], dtype=torch.int32)
            return {"point_coords": corners.to(self.device), "point_labels": labels.to(self.device)}, None
        if shape.kind == "mask" and shape.mask is not None:
            if (shape.mask.image_width, shape.mask.image_height) != (width, height):
                raise TrackerInputError("the mask to track is not the size of the frame")
            region = shape.mask
        elif shape.kind == "polygon" and shape.polygon is not None:
            region = mask_from_polygon(shape.polygon, width, height)
        else:
            raise TrackerInputError(f"SAM 2 tracks boxes, polygons and masks, not {shape.kind!r} shapes")
        if region.bbox_xyxy_inclusive() is None:
            raise TrackerInputError("the shape to track covers no pixel of the frame")
        # add_new_mask: to the model's input size with antialiasing, then binarised.
        full = torch.from_numpy(region.to_full()).float()[None, None].to(self.device)
        resized = F.interpolate(
            full, (self.size, self.size), mode="bilinear", align_corners=False, antialias=True
        )
        return None, (resized >= 0.5).float()

    def _features(self, frame: Frame) -> _Features:
        """The backbone's features of `frame`: from its embedding (on_embeddings), else from the small
        per-tracker cache when seen just before, else encoded here."""
        if self._embed is not None:
            return self._from_embedding(self._embed(frame))
        with self._lock, torch.inference_mode():
            cached = self._cache.get(frame.content_id)
            if cached is not None:
                self._cache.move_to_end(frame.content_id)
                return cached
            # As load_video_frames: PIL's default (bicubic) resize to a square, [0, 1], then normalised.
            resized = np.array(Image.fromarray(frame.image).resize((self.size, self.size)))
            image = _UNIT[torch.from_numpy(resized).long()].permute(2, 0, 1)
            image = ((image - _MEAN) / _STD)[None].to(self.device)
            backbone = self.model.forward_image(image)
            _, feats, pos, sizes = self.model._prepare_backbone_features(backbone)
            features = _Features(feats, pos, sizes)
            self._cache[frame.content_id] = features
            while len(self._cache) > _CACHED_FRAMES:
                self._cache.popitem(last=False)
            return features

    def _from_embedding(self, embedding: ImageEmbedding) -> _Features:
        """What _prepare_backbone_features makes of the backbone's output, from the cached maps."""
        maps = [embedding[name].to(self.device, torch.float32) for name in TENSORS]
        with torch.inference_mode():
            if self._vision_pos is None:  # sine tables of the level sizes: the same for every frame
                encode = self.model.image_encoder.neck.position_encoding
                self._vision_pos = [encode(m).to(m.dtype).flatten(2).permute(2, 0, 1) for m in maps]
            feats = [m.flatten(2).permute(2, 0, 1) for m in maps]
        return _Features(feats, self._vision_pos, [(m.shape[-2], m.shape[-1]) for m in maps])

    def _fill_holes(self, logits: torch.Tensor) -> torch.Tensor:
        if _HOLE_FILLING and self.model.fill_hole_area > 0:
            from sam2.utils.misc import fill_holes_in_mask_scores

            return fill_holes_in_mask_scores(logits, self.model.fill_hole_area)
        return logits


def _check_frame(frame: Frame) -> tuple[int, int]:
    image = frame.image
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape[:2]:
        raise TrackerInputError(f"frames are uint8 [H, W, 3] RGB, not {image.dtype}{image.shape}")
    return frame.size


def _tensor_bytes(memory: _Memory) -> int:
    tensors = [memory.pointer] + ([memory.features] if memory.features is not None else [])
    return sum(t.numel() * t.element_size() for t in tensors)
