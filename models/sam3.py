"""SAM 3 concepts ("find every instance of a noun phrase") on Hugging Face transformers' Sam3Model.

The work is split where its cost is:
- **Vision features, once per image** (`encode_prepared`): the ViT backbone and its FPN neck. The cached
  embedding holds the three FPN levels the detector reads, "fpn_0", "fpn_1", "fpn_2" ([1, 256, 288, 288],
  [1, 256, 144, 144], [1, 256, 72, 72] at the 1008-pixel input: 53 MiB per image in float16). The neck's
  fourth level (36 × 36) is never read by the image detector, and the position encodings are deterministic
  sine tables, recomputed (and kept per shape) rather than cached.
- **Text features, once per phrase** (`_text`): the CLIP text encoder and its projection, kept in a bounded
  LRU by phrase (`text_cache_bytes`).
- **The head, per request** (`find`): exemplar (geometry) encoder, DETR encoder and decoder, box head, dot
  product scoring and presence token, for every phrase of the request in one batch. Then, per phrase, the
  score threshold, the optional NMS and the cap; only the queries kept go through the mask embedder, and each
  kept mask is upsampled to the image only where it can be positive (models/upsample.py).

Preprocessing, scores and masks are Sam3Processor's (`post_process_instance_segmentation`: score = sigmoid
of the query's logit × sigmoid of the presence logit; mask = the bilinear resize of the mask probabilities to
the image, above `mask_threshold`), checked against it in tests/test_sam3_equivalence.py.

Weights load from a local Hugging Face snapshot directory only (`load_sam3`), and a checkpoint with a missing,
unexpected or mismatched key is refused: a silently random-initialised text encoder is how an earlier key
rename of facebook/sam3 looked to its users (facebook/sam3 discussion #263). Random init (`random_sam3`)
builds a config (full size, or the small one tests use) with a byte-level tokenizer that needs no files.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.base import ImageEmbedding, ImageEncoder, cuda_autocast
from models.concept import ConceptModel, ConceptParams, Exemplars, Instance
from models.hf_snapshot import load_strict
from models.sam3_clicks import Sam3Clicks
from models.shapes import RegionMask
from models.upsample import region_of, upsample_region

SAM3_ARCHITECTURES = ("sam3",)
# The cached FPN levels, highest resolution first, as Sam3Model's detector reads them.
TENSORS = ("fpn_0", "fpn_1", "fpn_2")
TEXT_TOKENS = 32  # Sam3Processor pads and truncates every phrase to this many tokens
PHRASE_BATCH = 8  # phrases run through the head together
# Files a snapshot directory must hold (facebook/sam3 also ships the video tracker's weights in the same
# model.safetensors, which Sam3Model skips by its own declared rule).
SNAPSHOT_FILES = ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json")

# A small SAM 3 (about 0.9 M parameters, 224-pixel input) with the full architecture's structure: the
# default tests and `bench_concepts.py --tiny` build it with random weights.
TINY_CONFIG: dict[str, Any] = {
    "vision_config": {
        "backbone_config": {
            "model_type": "sam3_vit_model",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 224,
            "patch_size": 14,
            "window_size": 8,
            "global_attn_indexes": [1],
        },
        "fpn_hidden_size": 32,
    },
    "text_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "projection_dim": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": TEXT_TOKENS,
    },
    "geometry_encoder_config": {
        "hidden_size": 32,
        "num_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
    "detr_encoder_config": {
        "hidden_size": 32,
        "num_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
    "detr_decoder_config": {
        "hidden_size": 32,
        "num_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "num_queries": 20,
    },
    "mask_decoder_config": {"hidden_size": 32, "num_attention_heads": 2},
}


# ---- building ---------------------------------------------------------------------------------------------
def byte_tokenizer() -> Any:
    """A CLIP tokenizer over the 256 byte symbols and no merges: every phrase tokenizes (one token per byte),
    offline, with no vocabulary file. Only for random weights, whose text encoder has learnt nothing."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def sam3_config(overrides: dict | None = None) -> Any:
    """Sam3Config: the full-size SAM 3 (no overrides), or `overrides` on top of it (e.g. TINY_CONFIG)."""
    from transformers import Sam3Config

    return Sam3Config(**(overrides or {}))


def random_processor(config: Any) -> Any:
    """Sam3Processor for randomly initialised weights: the image processor at the config's input size and the
    byte-level tokenizer (its ids fit any vocabulary of at least 514 entries)."""
    from transformers import Sam3Processor
    from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor

    size = int(config.vision_config.backbone_config.image_size)
    return Sam3Processor(
        image_processor=Sam3ImageProcessor(size={"height": size, "width": size}), tokenizer=byte_tokenizer()
    )


def random_sam3(config_overrides: dict | None = None) -> tuple[torch.nn.Module, Any]:
    """(Sam3Model, Sam3Processor) with random weights from the global torch seed: the caller seeds it."""
    from transformers import Sam3Model

    config = sam3_config(config_overrides)
    tokenizer_size = 514
    text = config.text_config
    if text.vocab_size < tokenizer_size:
        raise ValueError(f"the text encoder's vocabulary ({text.vocab_size}) is smaller than the tokenizer's")
    # The CLIP defaults point outside a small vocabulary; the byte tokenizer's own ids are these.
    text.bos_token_id, text.eos_token_id, text.pad_token_id = 512, 513, 513
    model = Sam3Model(config).eval()
    return model, random_processor(config)


def load_sam3(directory: Path) -> tuple[torch.nn.Module, Any]:
    """(Sam3Model, Sam3Processor) from a local Hugging Face snapshot of facebook/sam3 (never the network).
    CheckpointMismatch unless every weight of the model is in the checkpoint and every tensor of the
    checkpoint is a weight of the model (the video tracker's, which Sam3Model declares it skips, aside)."""
    from transformers import Sam3Model, Sam3Processor

    missing = [name for name in SNAPSHOT_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} is not a SAM 3 snapshot: {missing} missing")
    model = load_strict(Sam3Model, directory)
    processor = Sam3Processor.from_pretrained(directory, local_files_only=True)
    return model, processor


def snapshot_config(directory: Path) -> dict | None:
    """The config.json of a snapshot directory without weights (random init of that architecture)."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw = raw.get("detector_config") or raw  # facebook/sam3's is a video config: detector and tracker
    return {key: value for key, value in raw.items() if key.endswith("_config")}


# ---- the model --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prepared:
    pixels: torch.Tensor  # float32 [3, S, S]: the processor's resized and normalised image
    original_size: tuple[int, int]


@dataclass(frozen=True)
class _Text:
    features: torch.Tensor  # [TEXT_TOKENS, d] float32 on the model's device: the projected text features
    mask: torch.Tensor  # [TEXT_TOKENS] bool: the tokens that are not padding

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size() + self.mask.numel()


class _TextCache:
    """Phrase → text features, least recently used first out once `max_bytes` is exceeded."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, _Text] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, phrase: str) -> _Text | None:
        with self._lock:
            found = self._entries.get(phrase)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(phrase)
            self.hits += 1
            return found

    def put(self, phrase: str, text: _Text) -> None:
        with self._lock:
            if phrase in self._entries or text.nbytes > self.max_bytes:
                return
            self._entries[phrase] = text
            self._bytes += text.nbytes
            while self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.nbytes

    def stats(self) -> dict:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
            }


class Sam3Concepts(ConceptModel):
    preprocessing_version = "sam3-square-v1"

    def __init__(
        self,
        name: str,
        architecture: str,
        model: torch.nn.Module,
        processor: Any,
        device: torch.device,
        cache_dtype: torch.dtype = torch.float16,
        cache_on_model_device: bool = False,
        encoder_autocast: torch.dtype | None = None,
        text_cache_bytes: int = 64 * 2**20,
    ) -> None:
        self.name = name
        self.architecture = architecture
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.size = int(model.config.vision_config.backbone_config.image_size)
        self.cache_dtype = cache_dtype
        self.cache_device = device if cache_on_model_device else torch.device("cpu")
        self.encoder_autocast = encoder_autocast if device.type == "cuda" else None
        self.encoder_lock = threading.Lock()  # parallel encodes only fight over the same cores
        self.texts = _TextCache(text_cache_bytes)
        self._positions: dict[tuple[int, ...], torch.Tensor] = {}
        self._positions_lock = threading.Lock()
        self.clicks: Sam3Clicks | None = None  # the click head (models/sam3_clicks.py), when built with it

    # ---- encode -------------------------------------------------------------------------------------------
    def prepare(self, image: np.ndarray) -> Prepared:
        """Sam3ImageProcessor on the requesting thread: the stretch to S × S, rescale and normalisation."""
        with torch.inference_mode():
            pixels = self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        return Prepared(pixels, (int(image.shape[0]), int(image.shape[1])))

    def encode(self, image: np.ndarray) -> ImageEmbedding:
        return self.encode_prepared([self.prepare(image)])[0]

    def encode_batch(self, images: list[np.ndarray]) -> list[ImageEmbedding]:
        return self.encode_prepared([self.prepare(image) for image in images])

    def encode_prepared(self, prepared: list[Prepared]) -> list[ImageEmbedding]:
        """The detector's FPN levels and, when the model has a click head, its tracker features too, from one
        backbone pass (shared_pass splits them)."""
        batch = torch.stack([p.pixels for p in prepared]).to(self.device)
        with self.encoder_lock, torch.inference_mode(), cuda_autocast(self.encoder_autocast):
            spatial = self.backbone(batch)
            # The detector reads all neck levels but the last (Sam3Model.forward: fpn_hidden_states[:-1]).
            levels = self.model.vision_encoder.neck(spatial)[0][:-1]
            maps = dict(zip(TENSORS, levels, strict=True))
            if self.clicks is not None:
                maps.update(self.clicks.features(spatial))
        return self.per_image(maps, [p.original_size for p in prepared], (self.size, self.size))

    def backbone(self, pixels: torch.Tensor) -> torch.Tensor:
        """The ViT's output as a [B, C, g, g] map: what both necks read (Sam3VisionModel.forward)."""
        hidden = self.model.vision_encoder.backbone(pixels).last_hidden_state
        grid = pixels.shape[-1] // self.model.config.vision_config.backbone_config.patch_size
        return hidden.view(hidden.shape[0], grid, grid, -1).permute(0, 3, 1, 2)

    def shared_pass(
        self, embedding: ImageEmbedding
    ) -> tuple[ImageEmbedding, list[tuple[ImageEncoder, ImageEmbedding]]]:
        if self.clicks is None:
            return embedding, []
        own, theirs = (
            ImageEmbedding(
                {n: t for n, t in embedding.tensors.items() if (n in TENSORS) == mine},
                embedding.original_size,
                embedding.input_size,
            )
            for mine in (True, False)
        )
        return own, [(self.clicks, theirs)]

    def siblings(self) -> tuple[ImageEncoder, ...]:
        return () if self.clicks is None else (self.clicks,)

    def warm_up(self, max_batch: int) -> None:
        """One encoder pass at every batch size the encode scheduler may form (see SamSegmenter.warm_up)."""
        blank = Prepared(torch.zeros(3, self.size, self.size), (self.size, self.size))
        for size in range(1, max_batch + 1):
            self.encode_prepared([blank] * size)

    def _position(self, level: torch.Tensor) -> torch.Tensor:
        """The neck's sine position encoding of a level's shape ([1, C, h, w] float32), computed once."""
        key = tuple(level.shape)
        with self._positions_lock:
            found = self._positions.get(key)
            if found is None:
                encoding = self.model.vision_encoder.neck.position_encoding
                with torch.inference_mode():
                    found = encoding(level.shape, self.device, torch.float32)
                self._positions[key] = found
        return found

    # ---- text ---------------------------------------------------------------------------------------------
    def _text(self, phrases: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """([P, TEXT_TOKENS, d] features, [P, TEXT_TOKENS] mask) of the phrases, encoding only those that are
        not cached (in one batch)."""
        found = {phrase: self.texts.get(phrase) for phrase in dict.fromkeys(phrases)}
        missing = [phrase for phrase, text in found.items() if text is None]
        if missing:
            tokens = self.processor.tokenizer(
                missing, padding="max_length", max_length=TEXT_TOKENS, truncation=True, return_tensors="pt"
            )
            ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
            with torch.inference_mode():
                features = self.model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
            for i, phrase in enumerate(missing):
                text = _Text(features[i].float().clone(), mask[i].bool().clone())
                found[phrase] = text
                self.texts.put(phrase, text)
        texts = [found[phrase] for phrase in phrases]
        return torch.stack([t.features for t in texts]), torch.stack([t.mask for t in texts])

    def text_cache_stats(self) -> dict:
        return self.texts.stats()

    # ---- the head -----------------------------------------------------------------------------------------
    def find(
        self,
        embedding: ImageEmbedding,
        phrases: Sequence[str],
        params: ConceptParams,
        exemplars: Exemplars | None = None,
    ) -> list[list[Instance]]:
        levels = [embedding[name].to(self.device, torch.float32) for name in TENSORS]
        positions = [self._position(level) for level in levels]
        found: list[list[Instance]] = []
        for start in range(0, len(phrases), PHRASE_BATCH):
            chunk = list(phrases[start : start + PHRASE_BATCH])
            found.extend(self._find_chunk(embedding, levels, positions, chunk, params, exemplars))
        return found

    def _find_chunk(
        self,
        embedding: ImageEmbedding,
        levels: list[torch.Tensor],
        positions: list[torch.Tensor],
        phrases: list[str],
        params: ConceptParams,
        exemplars: Exemplars | None,
    ) -> list[list[Instance]]:
        from transformers.models.sam3.modeling_sam3 import box_cxcywh_to_xyxy, inverse_sigmoid

        model = self.model
        batch = len(phrases)
        height, width = embedding.original_size
        text_features, text_mask = self._text(phrases)
        fpn = [level.expand(batch, -1, -1, -1) for level in levels]
        pos = [p.expand(batch, -1, -1, -1) for p in positions]
        with torch.inference_mode():
            prompt, prompt_mask = text_features, text_mask
            if exemplars is not None and len(exemplars):
                geometry = model.geometry_encoder(
                    box_embeddings=self._exemplar_boxes(exemplars, height, width).expand(batch, -1, -1),
                    box_mask=torch.ones(batch, len(exemplars), dtype=torch.bool, device=self.device),
                    box_labels=torch.as_tensor(exemplars.labels, device=self.device).expand(batch, -1),
                    img_feats=fpn,
                    img_pos_embeds=pos,
                )
                prompt = torch.cat([text_features, geometry.last_hidden_state], dim=1)
                prompt_mask = torch.cat([text_mask, geometry.attention_mask], dim=1)
            encoded = model.detr_encoder(
                vision_features=[fpn[-1]],
                text_features=prompt,
                vision_pos_embeds=[pos[-1]],
                text_mask=prompt_mask,
            )
            decoded = model.detr_decoder(
                vision_features=encoded.last_hidden_state,
                text_features=encoded.text_features,
                vision_pos_encoding=encoded.pos_embeds_flattened,
                text_mask=prompt_mask,
                spatial_shapes=encoded.spatial_shapes,
            )
            hidden = decoded.intermediate_hidden_states  # [layers, batch, queries, d]
            offsets = model.detr_decoder.box_head(hidden[-1])
            reference = decoded.reference_boxes[-1]
            boxes_cxcywh = (inverse_sigmoid(reference) + offsets).sigmoid()
            logits = model.dot_product_scoring(
                decoder_hidden_states=hidden, text_features=encoded.text_features, text_mask=prompt_mask
            ).squeeze(-1)[-1]
            scores = logits.sigmoid() * decoded.presence_logits[-1].sigmoid()  # [batch, queries]
            scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=self.device)
            boxes = box_cxcywh_to_xyxy(boxes_cxcywh) * scale
            kept = [self._select(scores[b], boxes[b], params) for b in range(batch)]
            masks = self._masks(hidden[-1], fpn, encoded, prompt, prompt_mask, kept) if params.masks else {}
        found: list[list[Instance]] = []
        for b, phrase in enumerate(phrases):
            rows = kept[b].tolist()
            box_rows = boxes[b, kept[b]].clamp_min(0).cpu().numpy() if rows else np.zeros((0, 4))
            box_rows = np.minimum(box_rows, [width, height, width, height])
            score_rows = scores[b, kept[b]].cpu().tolist() if rows else []
            found.append(
                [
                    Instance(
                        phrase,
                        float(score_rows[i]),
                        tuple(float(v) for v in box_rows[i]),  # type: ignore[arg-type]
                        self._upsample(masks[b][i], height, width, params.mask_threshold)
                        if params.masks
                        else None,
                    )
                    for i in range(len(rows))
                ]
            )
        return found

    def _exemplar_boxes(self, exemplars: Exemplars, height: int, width: int) -> torch.Tensor:
        """[1, N, 4] normalised (cx, cy, w, h), as Sam3Processor turns pixel boxes into the model's input."""
        boxes = torch.as_tensor(exemplars.boxes, dtype=torch.float32, device=self.device)
        boxes = boxes / torch.tensor([width, height, width, height], dtype=torch.float32, device=self.device)
        x1, y1, x2, y2 = boxes.unbind(-1)
        return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)[None]

    @staticmethod
    def _select(scores: torch.Tensor, boxes: torch.Tensor, params: ConceptParams) -> torch.Tensor:
        """The queries kept for one phrase, best first: above the threshold, after NMS, at most the cap."""
        order = torch.sort(scores, descending=True, stable=True).indices
        order = order[scores[order] > params.score_threshold]
        if params.nms_iou is not None and len(order) > 1:
            from torchvision.ops import nms

            keep = nms(boxes[order].float(), scores[order].float(), params.nms_iou)
            order = order[keep]  # nms answers in decreasing score order
        return order[: params.max_instances]

    def _masks(
        self,
        queries: torch.Tensor,
        fpn: list[torch.Tensor],
        encoded: Any,
        prompt: torch.Tensor,
        prompt_mask: torch.Tensor,
        kept: list[torch.Tensor],
    ) -> dict[int, torch.Tensor]:
        """Mask probabilities [K, h, w] of the kept queries, by phrase; only phrases with instances run the
        pixel decoder, and only kept queries the mask embedder."""
        rows = [b for b, k in enumerate(kept) if len(k)]
        if not rows:
            return {}
        most = max(len(kept[b]) for b in rows)
        index = torch.zeros(len(rows), most, dtype=torch.long, device=self.device)
        for i, b in enumerate(rows):
            index[i, : len(kept[b])] = kept[b]
        picked = torch.stack([queries[b] for b in rows]).gather(
            1, index[..., None].expand(-1, -1, queries.shape[-1])
        )
        select = torch.tensor(rows, device=self.device)
        out = self.model.mask_decoder(
            decoder_queries=picked,
            backbone_features=[level[select] for level in fpn],
            encoder_hidden_states=encoded.last_hidden_state[select],
            prompt_features=prompt[select],
            prompt_mask=prompt_mask[select],
        )
        probabilities = out.pred_masks.sigmoid()
        return {b: probabilities[i, : len(kept[b])] for i, b in enumerate(rows)}

    def _upsample(self, probabilities: torch.Tensor, height: int, width: int, threshold: float) -> RegionMask:
        """The mask at the image's size: the bilinear resize of the probabilities above `threshold`, computed
        only where it can be (on CPU), or on the model's device with only the mask's box coming back."""
        if self.device.type == "cpu":
            return upsample_region(probabilities.float().contiguous().numpy(), height, width, threshold)
        with torch.inference_mode():
            full = F.interpolate(probabilities[None, None].float(), (height, width), mode="bilinear")[0, 0]
            return region_of(full > threshold)
