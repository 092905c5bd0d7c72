"""Loading a Hugging Face model class from a local snapshot strictly: every weight of the model in the
checkpoint and every tensor of the checkpoint a weight of the model, or nothing loads. (Ultralytics once ran a
randomly initialised prompt head silently, ultralytics#26144.) SAM 3's detector and its click head use it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class CheckpointMismatch(ValueError):
    """A checkpoint whose keys are not exactly the model's: refused, never half-loaded."""


def load_strict(model_class: Any, directory: Path) -> torch.nn.Module:
    """`model_class.from_pretrained` on a local directory (never the network), in float32 and eval mode;
    CheckpointMismatch on any missing, unexpected or mismatched key. Keys the class itself declares it skips
    (transformers' `_keys_to_ignore_on_load_unexpected`) are not reported by transformers, so not refused."""
    model, info = model_class.from_pretrained(
        directory, local_files_only=True, output_loading_info=True, dtype=torch.float32
    )
    problems = {
        kind: sorted(info.get(kind) or ())
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
    }
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        summary = "; ".join(f"{len(keys)} {kind} (e.g. {keys[:3]})" for kind, keys in problems.items())
        raise CheckpointMismatch(
            f"{directory / 'model.safetensors'} does not match transformers' {model_class.__name__}: "
            f"{summary}. It was not loaded: a missing weight would run randomly initialised. Fetch the "
            "pinned revision again (labelserve weights fetch)."
        )
    return model.eval()
