"""ImageEmbedding ⇄ bytes for the shared cache tiers: a small fixed header, then the raw tensor bytes.

No pickle or np.load: a Redis shared by many hosts must not be able to run code in this process, so reading
a blob only parses integers and views bytes, and anything that does not add up is refused as corrupt.
Values are little-endian, as on the x86-64 and arm64 hosts labelserve runs on.
"""

from __future__ import annotations

import math
import struct
import warnings

import numpy as np
import torch

from models.base import ImageEmbedding

MAGIC = b"LSEM"
VERSION = 1
# magic, version, dtype code, ndim, reserved, original (H, W), input (h, w)
_HEADER = struct.Struct("<4sBBBBIIII")
_DIM = struct.Struct("<I")
HEADER_SIZE = _HEADER.size
_MAX_NDIM = 8

_DTYPES: dict[int, tuple[torch.dtype, np.dtype]] = {
    1: (torch.float16, np.dtype("<f2")),
    2: (torch.float32, np.dtype("<f4")),
}
_CODES = {torch_dtype: code for code, (torch_dtype, _) in _DTYPES.items()}
# torch warns once that tensors over read-only memory must not be written; cached features never are.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class CorruptBlob(ValueError):
    """The bytes are not a blob this version wrote whole (truncated, foreign, or another format)."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode_blob(embedding: ImageEmbedding) -> bytes:
    features = embedding.features
    code = _CODES.get(features.dtype)
    if code is None:
        raise ValueError(f"cannot store {features.dtype} embeddings; the cache holds float16 or float32")
    array = features.detach().to("cpu").contiguous().numpy()
    sizes = (*embedding.original_size, *embedding.input_size)
    header = _HEADER.pack(MAGIC, VERSION, code, array.ndim, 0, *sizes)
    dims = b"".join(_DIM.pack(d) for d in array.shape)
    return b"".join((header, dims, array.astype(_DTYPES[code][1], copy=False).tobytes()))


def decode_blob(blob: bytes) -> ImageEmbedding:
    """The embedding on the CPU; CorruptBlob when the header or the length does not check out."""
    if len(blob) < _HEADER.size:
        raise CorruptBlob(f"{len(blob)} bytes is shorter than the header")
    magic, version, code, ndim, _, height, width, in_h, in_w = _HEADER.unpack_from(blob)
    if magic != MAGIC or version != VERSION:
        raise CorruptBlob(f"not a version-{VERSION} embedding blob (magic {magic!r}, version {version})")
    if code not in _DTYPES or not 1 <= ndim <= _MAX_NDIM:
        raise CorruptBlob(f"unknown dtype code {code} or rank {ndim}")
    if min(height, width, in_h, in_w) == 0:
        raise CorruptBlob("zero image size")
    offset = _HEADER.size + ndim * _DIM.size
    if len(blob) < offset:
        raise CorruptBlob("truncated shape")
    shape = tuple(_DIM.unpack_from(blob, _HEADER.size + i * _DIM.size)[0] for i in range(ndim))
    torch_dtype, np_dtype = _DTYPES[code]
    if not isinstance(blob, bytes):  # a mutable buffer could change under the cache: take a private copy
        blob = bytes(blob)
    expected = offset + math.prod(shape) * np_dtype.itemsize
    if len(blob) != expected or 0 in shape:
        raise CorruptBlob(f"{len(blob)} bytes where shape {shape} of {np_dtype} needs {expected}")
    # No copy: the tensor keeps the immutable bytes alive and reads them in place (nothing writes cached
    # features). A 2 MiB copy costs ~2 ms of page faults when glibc unmaps large blocks
    # (server/ops/allocator.py).
    features = torch.frombuffer(blob, dtype=torch_dtype, count=math.prod(shape), offset=offset).view(shape)
    return ImageEmbedding(features=features, original_size=(height, width), input_size=(in_h, in_w))
