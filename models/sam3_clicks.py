"""SAM 3 clicks (points, box, mask prompt) on Hugging Face transformers' Sam3TrackerModel, on cached features.

SAM 3 has one ViT backbone and two necks: the detector's (concepts, models/sam3.py) and the tracker's, a SAM 2
style neck whose features a SAM 2 style prompt encoder and mask decoder read. In transformers the tracker is
`Sam3TrackerModel`; facebook/sam3 ships its neck and heads in the same model.safetensors as the detector
(`tracker_neck.*`, `tracker_model.*`), and its backbone *is* the detector's (transformers' conversion mapping
loads `detector_model.vision_encoder.backbone.*` into it). So here the tracker's backbone is the detector's
module itself: one set of weights, and one backbone pass can feed both necks (`Sam3Concepts` computes these
features in its own encode, see `features`).

An embedding holds the tracker's neck output only (10 MiB per image in float16 at the 1008-pixel input),
never the whole inference state:
- "trk_high_res_0" [1, 32, 288, 288] and "trk_high_res_1" [1, 64, 144, 144]: neck levels 0 and 1 after the
  mask decoder's conv_s0 / conv_s1 (what `Sam3TrackerModel.get_image_features` precomputes);
- "trk_image_embed" [1, 256, 72, 72]: neck level 2, as `Sam3TrackerModel.forward` hands it to the mask
  decoder. transformers adds `no_memory_embedding` to the *last* neck level and then keeps the first three:
  with the default four-level neck that is the dropped 36 × 36 level, so level 2 goes in as is; with a
  three-level neck it is level 2. `features` does the same, whatever the config.

Preprocessing is the detector's (the same pixels, so one backbone pass serves both): Sam3ImageProcessor's
stretch to S × S with mean and std 0.5. Prompts are scaled from the image to the input as Sam3TrackerProcessor
does (x · S / W, y · S / H); masks are the low-resolution logits ([M, 4S/14, 4S/14]: 288 × 288 at 1008)
resized bilinearly straight to the image above 0, as `post_process_masks` does, computed only where they can
be positive (models/upsample.py). Checked against Sam3TrackerModel + processor: tests/test_sam3_clicks.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from models.base import Decoded, ImageEmbedding, Prompt, Segmenter, cuda_autocast
from models.hf_snapshot import CheckpointMismatch, load_strict
from models.sam import BOX_CHUNK, MASK_PROMPT_LOGIT
from models.shapes import RegionMask
from models.upsample import region_of, upsample_region

# The cached tensors, highest resolution first, as the mask decoder reads them.
TENSORS = ("trk_high_res_0", "trk_high_res_1", "trk_image_embed")
ARCHITECTURE_SUFFIX = "-tracker"  # the L2 tag of click features: never read as a concept model's FPN levels


# ---- building ---------------------------------------------------------------------------------------------
def tracker_config(detector_config: Any) -> Any:
    """Sam3TrackerConfig for the tracker of a SAM 3 detector (Sam3Config): the same vision config (backbone
    and neck sizes), the prompt encoder at its input size, and a mask decoder of the neck's width. At full
    size (fpn 256) these are transformers' defaults; a small detector (the tests') gets a small one."""
    from transformers import Sam3TrackerConfig

    vision = detector_config.vision_config.to_dict()
    backbone = detector_config.vision_config.backbone_config
    size, patch = int(backbone.image_size), int(backbone.patch_size)
    grid = size // patch
    vision["backbone_feature_sizes"] = [[4 * grid] * 2, [2 * grid] * 2, [grid] * 2]
    hidden = int(detector_config.vision_config.fpn_hidden_size)
    return Sam3TrackerConfig(
        vision_config=vision,
        prompt_encoder_config={"hidden_size": hidden, "image_size": size, "patch_size": patch},
        mask_decoder_config={
            "hidden_size": hidden,
            "mlp_dim": 8 * hidden,
            "iou_head_hidden_dim": hidden,
            "num_attention_heads": 8 if hidden >= 256 else 2,
        },
    )


def random_tracker(detector: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Sam3TrackerModel with random weights from `seed` (whatever the global generator's state), sharing the
    backbone module of `detector` (a Sam3Model), as facebook/sam3's tracker shares its weights."""
    from transformers import Sam3TrackerModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tracker = Sam3TrackerModel(tracker_config(detector.config))
    tracker.vision_encoder.backbone = detector.vision_encoder.backbone
    return tracker.eval()


def load_tracker(directory: Path, detector: torch.nn.Module) -> torch.nn.Module:
    """Sam3TrackerModel from the same local snapshot as `load_sam3`'s detector (never the network), refused
    with CheckpointMismatch on any missing, unexpected or mismatched key (the video tracker's memory weights,
    which Sam3TrackerModel declares it skips, aside), or when its backbone is not the detector's."""
    from transformers import Sam3TrackerModel

    tracker = load_strict(Sam3TrackerModel, directory)
    ours = dict(tracker.vision_encoder.backbone.state_dict())
    theirs = detector.vision_encoder.backbone.state_dict()
    if ours.keys() != theirs.keys() or not all(torch.equal(ours[k], theirs[k]) for k in theirs):
        raise CheckpointMismatch(
            f"{directory}: the tracker's backbone differs from the detector's; SAM 3 has one backbone."
        )
    tracker.vision_encoder.backbone = detector.vision_encoder.backbone  # one copy in memory
    return tracker.eval()


# ---- the model --------------------------------------------------------------------------------------------
class Sam3Clicks(Segmenter):
    """SAM 3's click head. `backbone(pixels)` is the shared ViT's spatial output ([B, C, g, g]);
    `encoder_lock` the concept model's, so the two heads' encodes do not fight over the same cores."""

    preprocessing_version = "sam3-tracker-v1"

    def __init__(
        self,
        name: str,
        architecture: str,
        tracker: torch.nn.Module,
        prepare: Callable[[np.ndarray], Any],
        backbone: Callable[[torch.Tensor], torch.Tensor],
        encoder_lock: threading.Lock,
        device: torch.device,
        cache_dtype: torch.dtype = torch.float16,
        cache_on_model_device: bool = False,
        encoder_autocast: torch.dtype | None = None,
    ) -> None:
        self.name = name
        self.architecture = architecture + ARCHITECTURE_SUFFIX
        self.tracker = tracker.to(device).eval()
        self.device = device
        self._prepare = prepare
        self._backbone = backbone
        self.encoder_lock = encoder_lock
        self.size = int(tracker.prompt_encoder.input_image_size)
        self.cache_dtype = cache_dtype
        self.cache_device = device if cache_on_model_device else torch.device("cpu")
        self.encoder_autocast = encoder_autocast if device.type == "cuda" else None
        self.mask_threshold = 0.0  # post_process_masks' default
        self.low_res = int(tracker.prompt_encoder.mask_input_size[0])
        with torch.inference_mode():
            self._image_pe = tracker.get_image_wide_positional_embeddings().detach()

    @property
    def queue_name(self) -> str:
        return f"{self.name}/clicks"  # its own encode queue beside the concept model's (same name)

    # ---- encode -------------------------------------------------------------------------------------------
    def prepare(self, image: np.ndarray) -> Any:
        return self._prepare(image)

    def encode(self, image: np.ndarray) -> ImageEmbedding:
        return self.encode_prepared([self.prepare(image)])[0]

    def encode_batch(self, images: list[np.ndarray]) -> list[ImageEmbedding]:
        return self.encode_prepared([self.prepare(image) for image in images])

    def encode_prepared(self, prepared: list[Any]) -> list[ImageEmbedding]:
        batch = torch.stack([p.pixels for p in prepared]).to(self.device)
        with self.encoder_lock, torch.inference_mode(), cuda_autocast(self.encoder_autocast):
            maps = self.features(self._backbone(batch))
        return self.per_image(maps, [p.original_size for p in prepared], (self.size, self.size))

    def features(self, spatial: torch.Tensor) -> dict[str, torch.Tensor]:
        """The cached tensors of a batch from the backbone's spatial output: the tracker's neck, conv_s0/s1 on
        levels 0 and 1, and no_memory_embedding on the last neck level, as Sam3TrackerModel does."""
        tracker = self.tracker
        levels = list(tracker.vision_encoder.neck(spatial)[0])
        levels[0] = tracker.mask_decoder.conv_s0(levels[0])
        levels[1] = tracker.mask_decoder.conv_s1(levels[1])
        # [1, 1, C] added to [B, C, h, w] after transformers' flatten / view round trip: per channel.
        levels[-1] = levels[-1] + tracker.no_memory_embedding.reshape(1, -1, 1, 1)
        return dict(zip(TENSORS, levels[: len(TENSORS)], strict=True))

    # ---- decode -------------------------------------------------------------------------------------------
    def _scale(self, embedding: ImageEmbedding, xy: np.ndarray) -> torch.Tensor:
        """Image pixels → input pixels, as Sam3TrackerProcessor._normalize_coordinates; `xy` [..., 2k]
        (points or boxes), the same shape back."""
        height, width = embedding.original_size
        coords = torch.as_tensor(xy, dtype=torch.float32, device=self.device).reshape(-1, 2)
        scale = torch.tensor([self.size / width, self.size / height], dtype=torch.float32, device=self.device)
        return (coords * scale).reshape(xy.shape)

    def decode(self, embedding: ImageEmbedding, prompt: Prompt, multimask: bool) -> Decoded:
        points = labels = boxes = masks = None
        if len(prompt.points):
            points = self._scale(embedding, prompt.points)[None, None]  # [1, 1, N, 2]
            labels = torch.as_tensor(prompt.labels, dtype=torch.int32, device=self.device)[None, None]
        if prompt.box is not None:
            boxes = self._scale(embedding, prompt.box[None]).reshape(1, 1, 4)
        if points is None and boxes is None:  # a mask alone: Sam3TrackerModel.forward's one "not a point"
            points = torch.zeros(1, 1, 1, 2, device=self.device)
            labels = -torch.ones(1, 1, 1, dtype=torch.int32, device=self.device)
        if prompt.mask_input is not None:
            masks = prompt.mask_input.to(self.device, torch.float)[None]  # [1, 1, h, w]
        low_res, iou = self._decode(embedding, points, labels, boxes, masks, multimask)
        return Decoded(low_res_logits=low_res[0, 0].float().cpu(), scores=iou[0, 0].float().cpu().numpy())

    def decode_boxes(self, embedding: ImageEmbedding, boxes: np.ndarray, multimask: bool) -> list[Decoded]:
        """Sam3TrackerModel with input_boxes [1, B, 4]: the boxes of a chunk in one decoder pass."""
        out: list[Decoded] = []
        for start in range(0, len(boxes), BOX_CHUNK):
            chunk = boxes[start : start + BOX_CHUNK].astype(np.float32)
            scaled = self._scale(embedding, chunk).reshape(1, len(chunk), 4)
            low_res, iou = self._decode(embedding, None, None, scaled, None, multimask)
            low_res, scores = low_res[0].float().cpu(), iou[0].float().cpu().numpy()
            out.extend(Decoded(low_res_logits=low_res[i], scores=scores[i]) for i in range(len(chunk)))
        return out

    def _decode(
        self,
        embedding: ImageEmbedding,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sam3TrackerModel.forward from `image_embeddings` on: the prompt encoder and the mask decoder."""
        tracker = self.tracker
        with torch.inference_mode():
            high_res = [embedding[name].to(self.device, torch.float) for name in TENSORS[:-1]]
            image_embed = embedding[TENSORS[-1]].to(self.device, torch.float)
            if masks is not None and masks.shape[-2:] != tracker.prompt_encoder.mask_input_size:
                masks = F.interpolate(
                    masks, tracker.prompt_encoder.mask_input_size, mode="bilinear", antialias=True
                )
            sparse, dense = tracker.prompt_encoder(
                input_points=points, input_labels=labels, input_boxes=boxes, input_masks=masks
            )
            low_res, iou, _, _ = tracker.mask_decoder(
                image_embeddings=image_embed,
                image_positional_embeddings=self._image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
                high_resolution_features=high_res,
            )
        return low_res, iou  # [1, P, M, h, w], [1, P, M]

    # ---- post-processing ----------------------------------------------------------------------------------
    def upsample(self, embedding: ImageEmbedding, low_res_logits: torch.Tensor) -> RegionMask:
        height, width = embedding.original_size
        if self.device.type == "cpu":
            source = low_res_logits.float().contiguous().numpy()
            return upsample_region(source, height, width, self.mask_threshold)
        with torch.inference_mode():  # post_process_masks on the model's device; only the mask's box back
            logits = low_res_logits[None, None].to(self.device, torch.float)
            full = F.interpolate(logits, (height, width), mode="bilinear", align_corners=False)[0, 0]
            return region_of(full > self.mask_threshold)

    def low_res_from_mask(self, embedding: ImageEmbedding, mask: RegionMask) -> torch.Tensor:
        """The stretched square input's low-resolution grid, so straight from the image to it."""
        small = cv2.resize(
            mask.to_full().astype(np.float32), (self.low_res, self.low_res), interpolation=cv2.INTER_AREA
        )
        return torch.from_numpy((small * 2.0 - 1.0) * MASK_PROMPT_LOGIT)[None]
