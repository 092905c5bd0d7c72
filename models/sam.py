"""SAM-family segmenters (SAM ViT-B/L/H, MobileSAM) with segment-anything's exact pre- and post-processing.

Masks are bit-for-bit SamPredictor's up to the 1024-pixel intermediate; the final upsampling to the original
resolution is done only inside the region where the mask can be positive (see `upsample`), which is what
makes clicks on 12 MP images cheap.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from models.base import Decoded, ImageEmbedding, Prompt, Segmenter, cuda_autocast, to_cache
from models.shapes import RegionMask
from models.upsample import region_of, upsample_region

# Logit magnitude given to a binary mask used as a prompt (SAM's own logits are of this order).
MASK_PROMPT_LOGIT = 10.0
# Boxes decoded in one pass of the mask decoder: its upscaling holds 8 MiB of activations per box.
BOX_CHUNK = 16

SAM_ARCHITECTURES = ("sam_vit_b", "sam_vit_l", "sam_vit_h", "mobile_sam")


def encoder_autocast(setting: str) -> torch.dtype | None:
    """The encoder's CUDA autocast dtype; None runs it in float32 (autocast has no float32 mode)."""
    return None if setting == "float32" else getattr(torch, setting)


def build_sam(architecture: str, checkpoint: Path | None) -> torch.nn.Module:
    """Build a SAM architecture; with no checkpoint the weights are whatever torch's RNG gives."""
    if architecture == "mobile_sam":
        with _quiet_timm():
            from mobile_sam import sam_model_registry as registry
        key = "vit_t"
    elif architecture in SAM_ARCHITECTURES:
        from segment_anything import sam_model_registry as registry

        key = architecture.removeprefix("sam_")
    else:
        raise ValueError(f"unknown SAM architecture {architecture!r}")
    return registry[key](checkpoint=str(checkpoint) if checkpoint else None).eval()


@contextlib.contextmanager
def _quiet_timm():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@dataclass(frozen=True)
class Resized:
    image: np.ndarray  # uint8 [h, w, 3], longest side = the encoder's input size
    original_size: tuple[int, int]


class SamSegmenter(Segmenter):
    preprocessing_version = "sam-rls1024-v1"

    def __init__(
        self,
        name: str,
        architecture: str,
        sam: torch.nn.Module,
        device: torch.device,
        cache_dtype: torch.dtype = torch.float16,
        cache_on_model_device: bool = False,
        encoder_autocast: torch.dtype | None = None,
    ) -> None:
        self.name = name
        self.architecture = architecture
        self.sam = sam.to(device)
        self.device = device
        self.cache_dtype = cache_dtype
        self.cache_device = device if cache_on_model_device else torch.device("cpu")
        self.encoder_autocast = encoder_autocast if device.type == "cuda" else None
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self.encoder_lock = threading.Lock()  # parallel encodes only fight over the same cores
        self._dense_pe = self.sam.prompt_encoder.get_dense_pe().detach()

    # ---- encode -------------------------------------------------------------------------------------------
    def encode(self, image: np.ndarray) -> ImageEmbedding:
        return self.encode_prepared([self.prepare(image)])[0]

    def encode_batch(self, images: list[np.ndarray]) -> list[ImageEmbedding]:
        """Several images in one encoder pass (each is resized and padded to the encoder's square input, so
        sizes may differ): on a GPU this amortises the ViT over the batch (bench/bench_gpu.py)."""
        return self.encode_prepared([self.prepare(image) for image in images])

    def prepare(self, image: np.ndarray) -> Resized:
        """segment-anything's resize of the longest side to 1024 (PIL, as SamPredictor does): the costly
        CPU step of an encode, 30-40 ms for a 1080p frame."""
        return Resized(self.transform.apply_image(image), (int(image.shape[0]), int(image.shape[1])))

    def warm_up(self, max_batch: int) -> None:
        """One encoder pass at every batch size the encode scheduler may form. On CUDA the first pass at a
        new size costs about a second (kernel loading and selection: 1.2 s per size for MobileSAM on an
        H100), which would otherwise stall the first clicks that happen to form such a batch."""
        side = self.sam.image_encoder.img_size
        blank = Resized(np.zeros((side, side, 3), np.uint8), (side, side))
        for size in range(1, max_batch + 1):
            self.encode_prepared([blank] * size)

    def encode_prepared(self, prepared: list[Resized]) -> list[ImageEmbedding]:
        inputs = [
            self.sam.preprocess(
                torch.as_tensor(p.image, device=self.device).permute(2, 0, 1).contiguous()[None]
            )
            for p in prepared
        ]
        with self.encoder_lock, torch.inference_mode(), cuda_autocast(self.encoder_autocast):
            features = self.sam.image_encoder(inputs[0] if len(inputs) == 1 else torch.cat(inputs))
        return [
            ImageEmbedding(
                {"image_embed": to_cache(features[i : i + 1], self.cache_dtype, self.cache_device)},
                original_size=p.original_size,
                input_size=(int(p.image.shape[0]), int(p.image.shape[1])),
            )
            for i, p in enumerate(prepared)
        ]

    # ---- decode -------------------------------------------------------------------------------------------
    def decode(self, embedding: ImageEmbedding, prompt: Prompt, multimask: bool) -> Decoded:
        points = None
        if len(prompt.points):
            coords = self.transform.apply_coords(prompt.points.astype(np.float32), embedding.original_size)
            points = (
                torch.as_tensor(coords, dtype=torch.float, device=self.device)[None],
                torch.as_tensor(prompt.labels, dtype=torch.int, device=self.device)[None],
            )
        boxes = None
        if prompt.box is not None:
            box = self.transform.apply_boxes(prompt.box[None].astype(np.float32), embedding.original_size)
            boxes = torch.as_tensor(box, dtype=torch.float, device=self.device)
        masks = None
        if prompt.mask_input is not None:
            masks = prompt.mask_input.to(self.device, torch.float)[None]
        with torch.inference_mode():
            sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=masks)
            low_res, iou = self.sam.mask_decoder(
                image_embeddings=embedding["image_embed"].to(self.device, torch.float),
                image_pe=self._dense_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
        return Decoded(low_res_logits=low_res[0].float().cpu(), scores=iou[0].float().cpu().numpy())

    def decode_boxes(self, embedding: ImageEmbedding, boxes: np.ndarray, multimask: bool) -> list[Decoded]:
        """SamPredictor.predict_torch's batch of boxes: the decoder repeats the image embedding per box."""
        image = embedding["image_embed"].to(self.device, torch.float)
        out: list[Decoded] = []
        for start in range(0, len(boxes), BOX_CHUNK):
            chunk = boxes[start : start + BOX_CHUNK].astype(np.float32)
            scaled = self.transform.apply_boxes(chunk, embedding.original_size)
            with torch.inference_mode():
                sparse, dense = self.sam.prompt_encoder(
                    points=None,
                    boxes=torch.as_tensor(scaled, dtype=torch.float, device=self.device),
                    masks=None,
                )
                low_res, iou = self.sam.mask_decoder(
                    image_embeddings=image,
                    image_pe=self._dense_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=multimask,
                )
            low_res, iou = low_res.float().cpu(), iou.float().cpu().numpy()
            out.extend(Decoded(low_res_logits=low_res[i], scores=iou[i]) for i in range(len(chunk)))
        return out

    # ---- post-processing ----------------------------------------------------------------------------------
    def upsample(self, embedding: ImageEmbedding, low_res_logits: torch.Tensor) -> RegionMask:
        if self.device.type != "cpu":
            return self.upsample_full(embedding, low_res_logits)
        height, width = embedding.original_size
        in_h, in_w = embedding.input_size
        size = self.sam.image_encoder.img_size
        # Step 1, exactly as Sam.postprocess_masks: to the padded encoder size, then crop the padding.
        mid = F.interpolate(
            low_res_logits[None, None].float(), (size, size), mode="bilinear", align_corners=False
        )
        mid = mid[0, 0, :in_h, :in_w].contiguous().numpy()
        # Step 2, bilinear to the original size, only where the mask can be positive.
        return upsample_region(mid, height, width, self.sam.mask_threshold)

    def upsample_full(self, embedding: ImageEmbedding, low_res_logits: torch.Tensor) -> RegionMask:
        """Sam.postprocess_masks itself, on the model's device; only the mask's bounding box is copied back.

        On a GPU the full-resolution interpolation costs next to nothing, while the host-side region path
        above would wait on a device-to-host copy of the logits and run on the CPU.
        """
        height, width = embedding.original_size
        in_h, in_w = embedding.input_size
        size = self.sam.image_encoder.img_size
        with torch.inference_mode():
            logits = low_res_logits[None, None].to(self.device, torch.float)
            mid = F.interpolate(logits, (size, size), mode="bilinear", align_corners=False)[..., :in_h, :in_w]
            full = F.interpolate(mid, (height, width), mode="bilinear", align_corners=False)[0, 0]
            return region_of(full > self.sam.mask_threshold)

    def low_res_from_mask(self, embedding: ImageEmbedding, mask: RegionMask) -> torch.Tensor:
        in_h, in_w = embedding.input_size
        size = self.sam.image_encoder.img_size
        full = mask.to_full().astype(np.float32)
        resized = cv2.resize(full, (in_w, in_h), interpolation=cv2.INTER_AREA)
        padded = np.zeros((size, size), np.float32)
        padded[:in_h, :in_w] = resized
        low = size // 4
        small = cv2.resize(padded, (low, low), interpolation=cv2.INTER_AREA)
        return torch.from_numpy((small * 2.0 - 1.0) * MASK_PROMPT_LOGIT)[None]
