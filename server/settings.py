"""All of labelserve's configuration, read from LABELSERVE_* environment variables (or a .env file)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from weights.store import default_weights_dir


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LABELSERVE_", env_file=".env", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8080

    # Models
    models: Annotated[list[str], NoDecode] = Field(
        default=["mobile_sam", "yolo11n"],
        description="Models loaded at start-up (comma-separated or JSON list).",
    )
    weights_dir: Path = Field(default_factory=default_weights_dir)
    detector_paths: dict[str, Path] = Field(
        default={},
        description='Extra detectors from local Ultralytics checkpoints, as JSON {"name": "/path/model.pt"}; '
        "loaded at start-up, not checked against the manifest. A model YAML (e.g. yolo11n-pose.yaml) "
        "builds the architecture with random weights when random_init is on.",
    )
    data_dir: Path = Field(
        default=Path("data"), description="Job database, ultralytics settings and other state it writes."
    )
    random_init: bool = Field(
        default=False,
        description="Build models whose weights are missing with seeded random weights (tests, benchmarks).",
    )
    random_seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    encoder_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        default="float16", description="Autocast dtype of the image encoder on CUDA (ignored on CPU)."
    )
    torch_threads: int = Field(default=0, description="CPU threads for torch; 0 = all cores.")

    # Embedding cache
    cache_bytes: int = Field(default=2 * 1024**3, description="Byte cap of the in-process embedding cache.")
    cache_dtype: Literal["float16", "float32"] = "float16"
    cache_device: Literal["cpu", "model"] = Field(
        default="cpu", description="Keep cached embeddings on the CPU, or on the model's device (GPU)."
    )
    prompt_history_bytes: int = Field(
        default=64 * 1024**2, description="Byte cap of the low-res logits kept for automatic refinement."
    )

    # Second-level embedding cache (L2): Redis shared by replicas, or a directory on one host; not both.
    cache_namespace: str = Field(
        default="labelserve",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Prefix of this deployment's L2 keys (Redis) or its subdirectory (disk); servers that "
        "share it share embeddings, and DELETE /v1/cache?scope=all clears only it.",
    )
    cache_redis_url: str | None = Field(
        default=None, description="redis://[:password@]host:port/db (or rediss://, unix://) of the L2 cache."
    )
    cache_redis_ttl_s: int = Field(
        default=24 * 3600, ge=1, description="Redis entries expire this long after their last use."
    )
    cache_redis_timeout_s: float = Field(
        default=0.25,
        gt=0,
        description="Connect and socket timeout of each Redis call; past it the call counts as failed and "
        "the request goes on without L2.",
    )
    cache_disk_dir: Path | None = Field(
        default=None, description="Directory of the on-disk L2 cache (single host, shared by its workers)."
    )
    cache_disk_bytes: int = Field(default=20 * 1024**3, ge=0, description="Byte cap of the on-disk L2 cache.")
    cache_l2_retry_s: float = Field(
        default=1.0,
        gt=0,
        description="After an L2 failure, L2 is skipped this long, then tried once; each further failure "
        "doubles the wait, up to cache_l2_retry_max_s.",
    )
    cache_l2_retry_max_s: float = Field(default=30.0, gt=0, description="Longest wait between L2 retries.")

    # Prefetch: embeddings computed in the background, behind interactive requests.
    prefetch_max_runs: int = Field(
        default=4, ge=1, description="Prefetch runs queued or running at once; more are refused (503)."
    )
    prefetch_max_images: int = Field(default=10_000, ge=1, description="Most images in one prefetch run.")

    # Detection: concurrent requests are micro-batched onto the model.
    detect_max_batch: int = Field(default=8, ge=1, description="Most images in one detector forward pass.")
    detect_max_wait_ms: float = Field(
        default=5.0, ge=0, description="How long a request waits for others to share its forward pass."
    )

    # Batch jobs
    job_prefetch: int = Field(default=16, ge=1, description="Decoded images queued ahead of the detector.")
    job_readers: int | None = Field(
        default=None,
        ge=0,
        description="Threads reading and decoding images ahead of inference; 0 reads in the inference thread."
        " Default: 4 with CUDA; 0 on a CPU-only host, where inference fills every core and readers slow it.",
    )
    job_concurrency: int = Field(default=1, ge=1, description="Jobs that run at the same time.")

    # Input limits
    max_image_pixels: int = Field(default=64_000_000, description="Larger images are refused (413).")
    max_request_bytes: int = Field(
        default=64 * 1024**2, description="Larger request bodies are refused (413)."
    )
    url_timeout_s: float = 20.0
    url_allow_private: bool = Field(
        default=False, description="Allow image URLs that resolve to private/loopback addresses."
    )

    # Output
    polygon_tolerance: float = 1.0

    # CVAT
    cvat_interactor_reply: Literal["shapes", "legacy"] = Field(
        default="shapes",
        description='"legacy" answers interactors with {"mask": H×W} for CVAT older than 2.60.',
    )
    cvat_browser_sam_model: str = Field(
        default="sam_vit_h",
        description="Model behind CVAT's in-browser SAM decoder (pth-facebookresearch-sam-vit-h); "
        "CVAT's decoder only works with sam_vit_h weights.",
    )

    @field_validator("models", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            return (
                json.loads(text)
                if text.startswith("[")
                else [n.strip() for n in text.split(",") if n.strip()]
            )
        return value

    @field_validator("cache_redis_url", "cache_disk_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _one_l2(self) -> Settings:
        if self.cache_redis_url and self.cache_disk_dir is not None:
            raise ValueError(
                "set LABELSERVE_CACHE_REDIS_URL or LABELSERVE_CACHE_DISK_DIR, not both: there is one L2 cache"
            )
        return self

    def job_reader_threads(self, cuda: bool) -> int:
        if self.job_readers is not None:
            return self.job_readers
        return 4 if cuda else 0


@lru_cache
def get_settings() -> Settings:
    return Settings()
