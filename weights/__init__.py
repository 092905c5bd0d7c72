"""Model checkpoints: the packaged manifest, verified local paths, and fetching (see weights.store)."""

from weights.store import (
    ChecksumMismatch,
    DownloadError,
    MissingWeights,
    UnknownWeights,
    WeightEntry,
    WeightsError,
    default_weights_dir,
    fetch,
    load_manifest,
    resolve,
    verify,
    weights_path,
)

__all__ = [
    "ChecksumMismatch",
    "DownloadError",
    "MissingWeights",
    "UnknownWeights",
    "WeightEntry",
    "WeightsError",
    "default_weights_dir",
    "fetch",
    "load_manifest",
    "resolve",
    "verify",
    "weights_path",
]
