"""SAM 2 / 2.1 clicks with SAM2ImagePredictor's exact pre- and post-processing, on cached features.

An embedding holds three tensors, here at the 1024-pixel input (8 MiB per image in float16, 16 in float32):
- "vision_feat" [1, 256, 64, 64]: the encoder's lowest-resolution level, as `_prepare_backbone_features` gives
  it to the video tracker: SAM2ImagePredictor's `image_embed` *before* `no_mem_embed` is added. The decode
  adds it (the same float32 addition as the predictor), and the SAM 2 tracker reads the level as is, so one
  cached embedding of a frame serves both (models/sam2_tracker.py `on_embeddings`).
- "high_res_0" [1, 32, 256, 256] and "high_res_1" [1, 64, 128, 128]: the predictor's `high_res_feats`
  (backbone levels 0 and 1 after the mask decoder's conv_s0 / conv_s1).

Preprocessing is SAM2Transforms' (the image stretched to the square input, ImageNet-normalised); prompts are
normalised by the image size and scaled to the input; a mask is the low-resolution logits resized bilinearly
straight to the image (the predictor's default: no hole filling), computed only where it can be positive
(models/upsample.py). Masks and scores are SAM2ImagePredictor's (tests/test_sam2_equivalence.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from models.base import Decoded, ImageEmbedding, Prompt, Segmenter, cuda_autocast
from models.sam import BOX_CHUNK, MASK_PROMPT_LOGIT
from models.shapes import RegionMask
from models.upsample import region_of, upsample_region

# Manifest architecture -> the config shipped inside Meta's `sam2` package.
SAM2_CONFIGS = {
    "sam2.1_hiera_tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_large": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "sam2_hiera_tiny": "configs/sam2/sam2_hiera_t.yaml",
    "sam2_hiera_small": "configs/sam2/sam2_hiera_s.yaml",
    "sam2_hiera_base_plus": "configs/sam2/sam2_hiera_b+.yaml",
    "sam2_hiera_large": "configs/sam2/sam2_hiera_l.yaml",
}

# The cached tensors, highest resolution first, as SAM 2's backbone levels are ordered.
TENSORS = ("high_res_0", "high_res_1", "vision_feat")
# SAM2ImagePredictor clamps the logits it hands back for reuse as a mask prompt.
_PROMPT_LOGIT_LIMIT = 32.0
_BOX_LABELS = (2, 3)  # SAM 2 encodes a box as two corner points with these labels


@dataclass(frozen=True)
class Prepared:
    image: torch.Tensor  # float32 [3, S, S], normalised: the encoder's input
    original_size: tuple[int, int]


class Sam2Segmenter(Segmenter):
    preprocessing_version = "sam2-square-v1"

    def __init__(
        self,
        name: str,
        architecture: str,
        model: torch.nn.Module,
        cache_dtype: torch.dtype = torch.float16,
        cache_on_model_device: bool = False,
        encoder_autocast: torch.dtype | None = None,
    ) -> None:
        from sam2.utils.transforms import SAM2Transforms

        self.name = name
        self.architecture = architecture
        self.model = model  # a SAM2Base (the registry builds SAM2VideoPredictor: the tracker shares it)
        self.device = model.device
        self.size = int(model.image_size)
        self.cache_dtype = cache_dtype
        self.cache_device = self.device if cache_on_model_device else torch.device("cpu")
        self.encoder_autocast = encoder_autocast if self.device.type == "cuda" else None
        self.mask_threshold = 0.0
        self.transforms = SAM2Transforms(resolution=self.size, mask_threshold=self.mask_threshold)
        self.encoder_lock = threading.Lock()  # parallel encodes only fight over the same cores
        with torch.inference_mode():
            self._dense_pe = model.sam_prompt_encoder.get_dense_pe().detach()
            self._no_mem_embed = (
                model.no_mem_embed.detach().reshape(1, -1, 1, 1) if model.directly_add_no_mem_embed else None
            )

    # ---- encode -------------------------------------------------------------------------------------------
    def encode(self, image: np.ndarray) -> ImageEmbedding:
        return self.encode_prepared([self.prepare(image)])[0]

    def encode_batch(self, images: list[np.ndarray]) -> list[ImageEmbedding]:
        return self.encode_prepared([self.prepare(image) for image in images])

    def prepare(self, image: np.ndarray) -> Prepared:
        """SAM2Transforms on the requesting thread: [0, 1], the stretch to S × S (bilinear, antialiased) and
        the normalisation, the CPU-side cost of an encode."""
        with torch.inference_mode():
            tensor = self.transforms(image)
        return Prepared(tensor, (int(image.shape[0]), int(image.shape[1])))

    def warm_up(self, max_batch: int) -> None:
        """One encoder pass at every batch size the encode scheduler may form (see SamSegmenter.warm_up)."""
        blank = Prepared(torch.zeros(3, self.size, self.size), (self.size, self.size))
        for size in range(1, max_batch + 1):
            self.encode_prepared([blank] * size)

    def encode_prepared(self, prepared: list[Prepared]) -> list[ImageEmbedding]:
        batch = torch.stack([p.image for p in prepared]).to(self.device)
        with self.encoder_lock, torch.inference_mode(), cuda_autocast(self.encoder_autocast):
            backbone = self.model.forward_image(batch)
        # _prepare_backbone_features only flattens these maps: the values are the predictor's and tracker's.
        levels = backbone["backbone_fpn"][-self.model.num_feature_levels :]
        maps = dict(zip(TENSORS, levels, strict=True))
        return self.per_image(maps, [p.original_size for p in prepared], (self.size, self.size))

    # ---- decode -------------------------------------------------------------------------------------------
    def decode(self, embedding: ImageEmbedding, prompt: Prompt, multimask: bool) -> Decoded:
        points = None
        if len(prompt.points):
            coords = torch.as_tensor(prompt.points, dtype=torch.float, device=self.device)
            coords = self.transforms.transform_coords(coords, normalize=True, orig_hw=embedding.original_size)
            labels = torch.as_tensor(prompt.labels, dtype=torch.int, device=self.device)
            points = (coords[None], labels[None])
        if prompt.box is not None:
            corners, corner_labels = self._box_points(embedding, prompt.box[None])
            # As SAM2ImagePredictor._predict: the box's corners go before the clicks.
            points = (
                (corners, corner_labels)
                if points is None
                else (torch.cat([corners, points[0]], dim=1), torch.cat([corner_labels, points[1]], dim=1))
            )
        masks = None
        if prompt.mask_input is not None:
            masks = prompt.mask_input.to(self.device, torch.float)[None]
        low_res, iou = self._decode(embedding, points, masks, multimask, repeat_image=False)
        return Decoded(low_res_logits=low_res[0].float().cpu(), scores=iou[0].float().cpu().numpy())

    def decode_boxes(self, embedding: ImageEmbedding, boxes: np.ndarray, multimask: bool) -> list[Decoded]:
        """SAM2ImagePredictor.predict with a [B, 4] box array: one decoder pass per chunk of boxes."""
        out: list[Decoded] = []
        for start in range(0, len(boxes), BOX_CHUNK):
            chunk = boxes[start : start + BOX_CHUNK]
            points = self._box_points(embedding, chunk)
            low_res, iou = self._decode(embedding, points, None, multimask, repeat_image=len(chunk) > 1)
            low_res, scores = low_res.float().cpu(), iou.float().cpu().numpy()
            out.extend(Decoded(low_res_logits=low_res[i], scores=scores[i]) for i in range(len(chunk)))
        return out

    def _box_points(self, embedding: ImageEmbedding, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 4] boxes as SAM 2's [B, 2, 2] corner points and their labels."""
        tensor = torch.as_tensor(boxes, dtype=torch.float, device=self.device)
        corners = self.transforms.transform_boxes(tensor, normalize=True, orig_hw=embedding.original_size)
        labels = torch.tensor([_BOX_LABELS], dtype=torch.int, device=self.device).repeat(len(boxes), 1)
        return corners, labels

    def _decode(
        self,
        embedding: ImageEmbedding,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        masks: torch.Tensor | None,
        multimask: bool,
        repeat_image: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            image_embed = embedding["vision_feat"].to(self.device, torch.float)
            if self._no_mem_embed is not None:
                image_embed = image_embed + self._no_mem_embed
            high_res = [embedding[name].to(self.device, torch.float) for name in TENSORS[:-1]]
            sparse, dense = self.model.sam_prompt_encoder(points=points, boxes=None, masks=masks)
            low_res, iou, _, _ = self.model.sam_mask_decoder(
                image_embeddings=image_embed,
                image_pe=self._dense_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
                repeat_image=repeat_image,
                high_res_features=high_res,
            )
        return low_res, iou

    def as_mask_prompt(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        return low_res_logits.clamp(-_PROMPT_LOGIT_LIMIT, _PROMPT_LOGIT_LIMIT)

    # ---- post-processing ----------------------------------------------------------------------------------
    def upsample(self, embedding: ImageEmbedding, low_res_logits: torch.Tensor) -> RegionMask:
        if self.device.type != "cpu":
            return self.upsample_full(embedding, low_res_logits)
        height, width = embedding.original_size
        source = low_res_logits.float().contiguous().numpy()
        return upsample_region(source, height, width, self.mask_threshold)

    def upsample_full(self, embedding: ImageEmbedding, low_res_logits: torch.Tensor) -> RegionMask:
        """SAM2Transforms.postprocess_masks itself, on the model's device; only the mask's box comes back."""
        height, width = embedding.original_size
        with torch.inference_mode():
            logits = low_res_logits[None, None].to(self.device, torch.float)
            full = F.interpolate(logits, (height, width), mode="bilinear", align_corners=False)[0, 0]
            return region_of(full > self.mask_threshold)

    def low_res_from_mask(self, embedding: ImageEmbedding, mask: RegionMask) -> torch.Tensor:
        """The stretched square input's low-resolution grid, so straight from the image to it."""
        low = self.size // 4
        small = cv2.resize(mask.to_full().astype(np.float32), (low, low), interpolation=cv2.INTER_AREA)
        return torch.from_numpy((small * 2.0 - 1.0) * MASK_PROMPT_LOGIT)[None]
