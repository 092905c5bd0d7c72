"""All of labelserve's configuration, read from LABELSERVE_* environment variables (or a .env file)."""

from __future__ import annotations

import ipaddress
import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.config import ModelsConfig
from models.vocabulary import check_vocabulary
from weights.store import default_weights_dir


class StorageProfile(BaseModel):
    """One S3-compatible endpoint (Backblaze B2, AWS S3, ...), its credentials, and what they may reach."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str = Field(description="e.g. https://s3.eu-central-003.backblazeb2.com")
    region: str = Field(
        min_length=1, description="The endpoint's region (B2: eu-central-003); SigV4 signs with it."
    )
    access_key_id: str = Field(min_length=1, description="B2: the application key's keyID.")
    secret_access_key: SecretStr | None = Field(default=None, description="B2: the application key.")
    secret_file: Path | None = Field(
        default=None, description="A file holding only the secret (a Docker or Kubernetes secret)."
    )
    buckets: tuple[str, ...] = Field(
        min_length=1, description="The buckets it serves; s3:// URLs naming any other bucket get a 403."
    )
    prefix: str = Field(default="", description="Only keys starting with this are served (else 403).")

    @model_validator(mode="after")
    def _one_secret(self) -> StorageProfile:
        if (self.secret_access_key is None) == (self.secret_file is None):
            raise ValueError("give exactly one of 'secret_access_key' or 'secret_file'")
        return self

    def secret(self) -> str:
        """The secret, read from `secret_file` at each call so a rotated file is picked up (OSError)."""
        if self.secret_access_key is not None:
            return self.secret_access_key.get_secret_value()
        assert self.secret_file is not None
        return self.secret_file.read_text().strip()


class CvatProfile(BaseModel):
    """A CVAT server and its credentials, named in job specs as `"profile": NAME`."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="CVAT's address, e.g. https://app.cvat.ai.")
    token: SecretStr | None = Field(
        default=None, description="A CVAT personal access token (or username+password)."
    )
    username: str | None = Field(default=None, description="With password, instead of a token.")
    password: SecretStr | None = Field(default=None, description="The username's password.")
    organization: str | None = Field(
        default=None,
        description="Organization slug whose tasks the profile works on (CVAT's X-Organization).",
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="The secret of this CVAT's webhooks (POST /v1/cvat/webhooks/NAME): CVAT signs each "
        "delivery with it (X-Signature-256), and one without a valid signature is refused. No secret: this "
        "profile's webhooks are refused.",
    )


Scope = Literal["interactive", "jobs", "admin", "metrics"]


class ApiKeyEntry(BaseModel):
    """One API key as the server stores it: never the key itself, only its hash."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$",
        description="Who holds the key; the audit log names it.",
    )
    hash: str = Field(
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="sha256:HEX of the key, as `labelserve keys create` prints it.",
    )
    scopes: tuple[Scope, ...] = Field(min_length=1, description="What the key may call.")


class Settings(BaseSettings):
    # "__" lets each field of a storage profile be its own variable:
    # LABELSERVE_STORAGE_PROFILES__B2__SECRET_ACCESS_KEY=...
    model_config = SettingsConfigDict(
        env_prefix="LABELSERVE_", env_file=".env", extra="ignore", env_nested_delimiter="__"
    )

    host: str = Field(
        default="127.0.0.1", description="Address `labelserve serve` listens on (0.0.0.0: all)."
    )
    port: int = Field(default=8080, description="Port of the API (and of CVAT's Nuclio routes).")
    keep_alive_s: float = Field(
        default=75,
        gt=0,
        description="How long an idle client connection stays open. Longer than the idle timeout of the load "
        "balancer or proxy in front (60 s on AWS ALB, nginx's upstream default), so that the server never "
        "closes a connection the proxy is about to reuse (which clients see as 502s or dropped requests).",
    )
    shutdown_timeout_s: int = Field(
        default=20,
        ge=1,
        description="On SIGTERM, the longest the server waits for requests in flight before it stops anyway. "
        "Encodes not yet started are answered 503 `shutting_down` at once, so only running encodes and "
        "clicks wait. Keep it below the orchestrator's grace period (Kubernetes: 30 s), then SIGKILL.",
    )

    # Models
    models: Annotated[list[str], NoDecode] = Field(
        default=["mobile_sam", "yolo11n"],
        description="Models loaded at start-up (comma-separated or JSON list).",
    )
    weights_dir: Path = Field(
        default_factory=default_weights_dir,
        description="Where checkpoints are fetched to and looked up (default ~/.cache/labelserve/weights).",
    )
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
    random_seed: int = Field(
        default=0, description="torch's seed before building a model with random weights."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where models run; auto takes CUDA when torch sees a GPU."
    )
    encoder_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        default="float16", description="Autocast dtype of the image encoder on CUDA (ignored on CPU)."
    )
    torch_threads: int = Field(default=0, description="CPU threads for torch; 0 = all cores.")
    allocator: Literal["auto", "tcmalloc", "jemalloc", "glibc", "untuned"] = Field(
        default="auto",
        description="The C allocator `labelserve serve` runs under (it re-executes itself with LD_PRELOAD): "
        "auto takes jemalloc (Debian: libjemalloc2; freed pages kept for reuse, MALLOC_CONF), else tcmalloc "
        "(libtcmalloc-minimal4), else glibc tuned to keep freed buffers; untuned leaves glibc as it comes.",
    )
    memory_trim_s: float = Field(
        default=0,
        ge=0,
        description="Every this many seconds, return the allocator's free memory to the system (glibc's "
        "malloc_trim, jemalloc's purge, tcmalloc's release) on a thread of its own; 0: never. Bounds RSS "
        "more tightly, and the encodes and clicks after each trim pay page faults (docs: operations).",
    )

    # Embedding cache
    cache_bytes: int = Field(default=2 * 1024**3, description="Byte cap of the in-process embedding cache.")
    cache_dtype: Literal["float16", "float32"] = Field(
        default="float16", description="Precision of cached embeddings (float16: 2 MiB per SAM image)."
    )
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
    job_checkpoint_s: float = Field(
        default=2.0,
        ge=0,
        description="A video job commits its results and its tracker's state about this often (after a whole "
        "batch): a crash redoes at most this much work. 0 commits after every batch.",
    )
    job_retention_days: float = Field(
        default=30,
        ge=0,
        description="Finished jobs (completed, failed, cancelled) older than this many days are deleted from "
        "the job database, at start and at each submission; 0 keeps them forever. Output files stay.",
    )

    # Tracking: per-object states live server-side; clients hold ids (CVAT round-trips them every frame).
    track_state_ttl_s: float = Field(
        default=8 * 3600, gt=0, description="An unused tracking state expires after this (CVAT's is 8 h)."
    )
    track_state_bytes: int = Field(
        default=512 * 1024**2, ge=1, description="Byte cap of all tracking states; the least recent go first."
    )
    track_max_objects: int = Field(default=64, ge=1, description="Most objects one tracking call may start.")
    sam2_memory_frames: int = Field(
        default=6,
        ge=1,
        le=6,
        description="Recent frames whose memory a SAM 2 track keeps besides the prompted one (SAM 2 reads 6);"
        " fewer saves memory per tracked object, at some accuracy.",
    )

    concept_text_cache_bytes: int = Field(
        default=64 * 1024**2,
        ge=0,
        description="Byte cap, per concept model (SAM 3), of the text features kept per phrase (32 KiB a "
        "phrase at full size); a cached phrase skips the text encoder.",
    )

    concept_vocabulary: dict[str, list[str]] = Field(
        default={},
        description="What a concept model (SAM 3) finds as a detector (CVAT's Nuclio detector, the agent's "
        'DetectionFunction, /v1/detect, jobs without a vocabulary of their own): JSON {"label": ["phrase", '
        '...]}, e.g. {"car": ["car", "van"], "person": ["person"]}; an empty list means the label itself. '
        "Empty: concept models are not offered as detectors.",
    )
    concept_vocabulary_file: Path | None = Field(
        default=None,
        description="A YAML (or JSON) file holding the vocabulary instead (label: [phrases]); read at start.",
    )
    concept_output: Literal["mask", "box"] = Field(
        default="mask",
        description="What a concept model answers as a detector: masks (with polygons), or boxes.",
    )

    # Encoder micro-batching: first clicks and prefetches that arrive together share one encoder pass.
    encode_max_batch: int | None = Field(
        default=None,
        ge=1,
        description="Most images in one SAM encoder pass; default 4 with CUDA, 1 on a CPU (where one encode "
        "already fills every core, so batching would only delay the first image).",
    )
    encode_max_wait_ms: float = Field(
        default=2.0, ge=0, description="How long an encode waits for others to share its pass (GPU)."
    )

    # Backpressure: bounded work in flight; beyond it, 503 with Retry-After instead of unbounded queues.
    max_inflight_interactive: int = Field(
        default=32, ge=1, description="Interactive requests (SAM, detect, track, CVAT calls) served at once."
    )
    max_inflight_other: int = Field(default=16, ge=1, description="Job and admin requests served at once.")
    detect_queue_max: int = Field(
        default=64, ge=1, description="Detection requests waiting for a detector's forward pass, per model."
    )
    busy_retry_after_s: float = Field(default=1.0, gt=0, description="Retry-After sent with a 503 when full.")
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="Longest a request waits for a model queue before a 504."
    )

    # Scale-out on Ray Serve (`labelserve serve --engine ray`, serve.yaml; docs/scale-out.md). Needs the
    # `ray` extra; the plain `labelserve serve` ignores these.
    ray_address: str | None = Field(
        default=None,
        description="Ray cluster to join (`auto`, or ray://host:10001); unset: start a local Ray instance.",
    )
    ray_min_replicas: int = Field(default=2, ge=1, description="Fewest worker replicas (each holds an L1).")
    ray_max_replicas: int = Field(
        default=2,
        ge=1,
        description="Most worker replicas; above ray_min_replicas Serve autoscales on ongoing requests. Each "
        "scale event moves some images to another replica, which reads them from L2.",
    )
    ray_target_ongoing_requests: float = Field(
        default=2.0, gt=0, description="Autoscaling target: requests in flight per worker replica."
    )
    ray_max_ongoing_requests: int = Field(
        default=4,
        ge=1,
        description="Requests one worker replica serves at once; beyond it a request spills to the next "
        "replica on the hash ring.",
    )
    ray_max_queued_requests: int = Field(
        default=64,
        ge=1,
        description="Requests waiting for a worker replica, per caller; beyond it 429 with Retry-After.",
    )
    ray_fallback_replicas: int = Field(
        default=1,
        ge=0,
        description="Ring successors a request may spill to when its image's replica is full (0: wait).",
    )
    ray_replica_num_cpus: float = Field(default=1.0, gt=0, description="CPUs Ray reserves per worker.")
    ray_replica_num_gpus: float = Field(
        default=0.0,
        ge=0,
        description="GPUs Ray reserves per worker; a fraction shares one GPU (a scheduling figure only: "
        "cap the memory with ray_gpu_memory_fraction).",
    )
    ray_gpu_memory_fraction: float | None = Field(
        default=None, gt=0, le=1, description="Share of the GPU's memory one worker replica may allocate."
    )
    # Batch jobs on Ray Data (`"engine": "ray"` in a job spec, `labelserve prelabel --engine ray`).
    ray_job_actors: int = Field(
        default=1,
        ge=1,
        description="Detector actors of a Ray job (each loads the job's models once); one per GPU.",
    )
    ray_job_num_gpus: float | None = Field(
        default=None,
        ge=0,
        description="GPUs Ray reserves per job actor; unset: 1 when the cluster has GPUs, else 0 (Ray hides "
        "the GPUs from an actor that reserved none).",
    )
    ray_job_num_cpus: float = Field(default=1.0, gt=0, description="CPUs Ray reserves per job actor.")

    # Input limits
    max_image_pixels: int = Field(default=64_000_000, description="Larger images are refused (413).")
    max_request_bytes: int = Field(
        default=64 * 1024**2, description="Larger request bodies are refused (413)."
    )
    max_video_frames: int = Field(
        default=3000,
        ge=1,
        description="Videos of more frames are refused by POST /v1/video/frame (413): each request decodes "
        "the video from its start, so stepping frame by frame is for short clips (propagate and jobs read "
        "any length).",
    )
    sam_max_boxes: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="Most boxes one /segment request may give in `boxes` (more: 422); the decoder runs 16 "
        "boxes per pass, so this bounds a request's decode time.",
    )
    url_timeout_s: float = Field(default=20.0, description="Timeout of fetching an image URL (http, https).")
    url_allow_private: bool = Field(
        default=False, description="Allow image URLs that resolve to private/loopback addresses."
    )
    url_allow_hosts: Annotated[list[str], NoDecode] = Field(
        default=[],
        description="Host names and CIDR networks that image URLs may reach even when private "
        "(comma-separated or JSON list), e.g. minio.internal,10.1.0.0/16.",
    )

    # Object storage (S3-compatible): s3://bucket/key wherever an image, a job source or output is taken
    storage_profiles: dict[str, StorageProfile] = Field(
        default={},
        description='JSON {"name": {endpoint_url, region, access_key_id, secret_access_key | secret_file, '
        "buckets, prefix}}; a bucket belongs to one profile, and buckets in none are refused.",
    )
    s3_cache_bytes: int = Field(
        default=256 * 1024**2, ge=0, description="Byte cap of the cache of downloaded objects."
    )
    s3_revalidate_after_s: float = Field(
        default=0.0,
        ge=0,
        description="A cached object is reused without asking the store for this long after it was last "
        "checked; 0 revalidates (If-None-Match) on every read.",
    )
    s3_interactive_attempts: int = Field(
        default=3, ge=1, description="Attempts (first one included) for reads serving an API request."
    )
    s3_job_attempts: int = Field(default=8, ge=1, description="Attempts for job reads, listings, uploads.")
    s3_timeout_s: float = Field(default=10.0, gt=0, description="Connect and read timeout of each attempt.")
    s3_max_connections: int = Field(default=32, ge=1, description="Connection pool size per profile.")

    # Output
    polygon_tolerance: float = Field(
        default=1.0,
        description="Default Douglas-Peucker tolerance of polygon outputs, in pixels (0: every vertex).",
    )

    # CVAT
    cvat_detect_tile: int | None = Field(
        default=None,
        ge=64,
        description="Sliced detection for CVAT's detector functions, whose requests carry no such parameter: "
        "the tile side in pixels (as the API's 'tile'), for deployments that label large images.",
    )
    cvat_interactor_reply: Literal["shapes", "legacy"] = Field(
        default="shapes",
        description='"legacy" answers interactors with {"mask": H×W} for CVAT older than 2.60.',
    )
    cvat_browser_sam_model: str = Field(
        default="sam_vit_h",
        description="Model behind CVAT's in-browser SAM decoder (pth-facebookresearch-sam-vit-h); "
        "CVAT's decoder only works with sam_vit_h weights.",
    )
    cvat_profiles: dict[str, CvatProfile] = Field(
        default={},
        description='CVAT servers jobs may name as "profile", as JSON {"name": {"url", "token" | "username" '
        '+ "password", "organization"?}}; their credentials never enter the job database.',
    )
    cvat_timeout_s: float = Field(default=60.0, gt=0, description="Timeout of each request to a CVAT server.")
    cvat_verify_ssl: bool = Field(default=True, description="Verify CVAT servers' TLS certificates.")
    cvat_upload_chunk: int = Field(
        default=2000, ge=1, description="Annotations per upload request into a CVAT task (whole images)."
    )
    # Warm embeddings before the annotator arrives: CVAT webhooks and look-ahead from clicks.
    cvat_prefetch_models: Annotated[list[str], NoDecode] = Field(
        default=[],
        description="SAM models whose embeddings CVAT webhooks and look-ahead compute (comma-separated); "
        "empty: every SAM model in LABELSERVE_MODELS.",
    )
    cvat_prefetch_frames: int = Field(
        default=500, ge=1, description="Most frames one webhook run prefetches (from the job's first frame)."
    )
    cvat_prefetch_new_tasks: bool = Field(
        default=False,
        description="Also prefetch a new task's first frames when CVAT says its data is ready (the "
        "create:task or completed:request[create:task] webhook events), before anyone is assigned.",
    )
    cvat_lookahead_max: int = Field(
        default=16, ge=1, description="Most frames one look-ahead request (POST /v1/cvat/lookahead) asks for."
    )

    # Access control: with no keys configured every endpoint is open, as on a single-user workstation.
    api_keys: list[ApiKeyEntry] = Field(
        default=[],
        description='API keys as JSON [{"id", "hash": "sha256:HEX", "scopes": [...]}]; with any key (or a '
        "keys file) configured, every endpoint but /healthz and /readyz needs one.",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="A file of API keys, one JSON object per line as in api_keys ('#' comments allowed), "
        "read again whenever it changes; keys can be added and revoked without a restart.",
    )
    cvat_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Also serve CVAT's Nuclio routes (/api/functions*) on this port, without API keys: CVAT "
        "sends none. Firewall it to the CVAT hosts.",
    )
    cvat_host: str | None = Field(
        default=None, description="Address the CVAT listener binds to; default: LABELSERVE_HOST."
    )
    cvat_allow_ips: Annotated[list[str], NoDecode] = Field(
        default=[],
        description="Networks (CIDR, comma-separated or JSON list) whose clients call the Nuclio routes "
        "without a key on the API port; on the CVAT listener, the only clients served when given.",
    )

    # Observability
    log_format: Literal["text", "json"] = Field(
        default="text", description="`json`: one JSON object per log line, with the request id."
    )
    audit_log_file: Path | None = Field(
        default=None,
        description="Also append the audit log (one JSON line per request) to this file, which may be "
        "rotated by renaming it.",
    )

    @field_validator("models", "url_allow_hosts", "cvat_allow_ips", "cvat_prefetch_models", mode="before")
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

    @field_validator("storage_profiles")
    @classmethod
    def _bucket_in_one_profile(cls, profiles: dict[str, StorageProfile]) -> dict[str, StorageProfile]:
        owner: dict[str, str] = {}
        for name, profile in profiles.items():
            for bucket in profile.buckets:
                if bucket in owner:
                    raise ValueError(f"bucket {bucket!r} is in profiles {owner[bucket]!r} and {name!r}")
                owner[bucket] = name
        return profiles

    @field_validator("cvat_allow_ips")
    @classmethod
    def _networks(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"cvat_allow_ips: {entry!r} is not an IP address or CIDR network") from None
        return entries

    @field_validator("api_keys")
    @classmethod
    def _unique_key_ids(cls, keys: list[ApiKeyEntry]) -> list[ApiKeyEntry]:
        ids = [key.id for key in keys]
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        if duplicated:
            raise ValueError(
                f"api_keys: ids {duplicated} appear more than once; audit lines name one key each"
            )
        return keys

    @model_validator(mode="after")
    def _cvat_port_differs(self) -> Settings:
        if self.cvat_port is not None and self.cvat_port == self.port:
            raise ValueError("cvat_port must differ from port: the CVAT listener is a second server")
        return self

    @field_validator("cache_redis_url", "cache_disk_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _ray_replica_range(self) -> Settings:
        if self.ray_max_replicas < self.ray_min_replicas:
            raise ValueError("ray_max_replicas must be at least ray_min_replicas")
        return self

    @model_validator(mode="after")
    def _one_l2(self) -> Settings:
        if self.cache_redis_url and self.cache_disk_dir is not None:
            raise ValueError(
                "set LABELSERVE_CACHE_REDIS_URL or LABELSERVE_CACHE_DISK_DIR, not both: there is one L2 cache"
            )
        return self

    @model_validator(mode="after")
    def _vocabulary(self) -> Settings:
        if self.concept_vocabulary_file is not None:
            if self.concept_vocabulary:
                raise ValueError(
                    "set LABELSERVE_CONCEPT_VOCABULARY or LABELSERVE_CONCEPT_VOCABULARY_FILE, not both"
                )
            import yaml  # YAML is a superset of JSON: either file format reads

            try:
                raw = yaml.safe_load(self.concept_vocabulary_file.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError) as exc:
                raise ValueError(f"concept_vocabulary_file {self.concept_vocabulary_file}: {exc}") from None
            if not isinstance(raw, dict):
                raise ValueError(f"concept_vocabulary_file {self.concept_vocabulary_file}: not a mapping")
            self.concept_vocabulary = check_vocabulary(raw)
        else:
            self.concept_vocabulary = check_vocabulary(self.concept_vocabulary)
        return self

    def encode_batch_limit(self, cuda: bool) -> int:
        # 4, not 8: on an H100, 8 gained 1-6 % over 4 for ViT-H and ViT-B, and MobileSAM at 8 stalled.
        return self.encode_max_batch or (4 if cuda else 1)

    def models_config(self) -> ModelsConfig:
        """What models/ reads of these settings: the registry takes this, never Settings itself."""
        return ModelsConfig(
            models=list(self.models),
            detector_paths=dict(self.detector_paths),
            weights_dir=self.weights_dir,
            data_dir=self.data_dir,
            device=self.device,
            torch_threads=self.torch_threads,
            random_init=self.random_init,
            random_seed=self.random_seed,
            cache_dtype=self.cache_dtype,
            cache_device=self.cache_device,
            encoder_dtype=self.encoder_dtype,
            warm_up_batch=self.encode_batch_limit(cuda=True),
            sam2_memory_frames=self.sam2_memory_frames,
            concept_text_cache_bytes=self.concept_text_cache_bytes,
            concept_vocabulary=dict(self.concept_vocabulary),
            concept_output=self.concept_output,
        )

    def job_reader_threads(self, cuda: bool) -> int:
        if self.job_readers is not None:
            return self.job_readers
        return 4 if cuda else 0


@lru_cache
def get_settings() -> Settings:
    return Settings()
