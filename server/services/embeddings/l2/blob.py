"""ImageEmbedding ⇄ bytes for the shared cache tiers: a small header, a table of tensors, then the values.

Version 2 holds a named set of tensors (SAM: one, SAM 2: three) and the architecture that wrote them:

    header   <4sBBBBIIII   magic "LSEM", version 2, tensor count, tag length, reserved 0, original (H, W),
                            input (h, w)
    tag      the architecture (ASCII), e.g. "sam_vit_b", "sam2.1_hiera_tiny"
    table    per tensor: <BBBB name length, dtype code, rank, reserved 0; rank × <I dims; the name (ASCII)
    values   each tensor's values, starting on a 16-byte boundary (zero padding before it)

A reader names the architecture it expects: a blob with another tag is `ForeignBlob`, never an embedding, so
an entry written by one model's architecture cannot be decoded by another's. Version-1 blobs (one unnamed
tensor, no tag) are refused as corrupt; the tiers keep each version under its own prefix (`emb<version>`),
so they are not even looked up, and they expire (Redis TTL) or can be deleted (the disk tier's `emb1/`).

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
VERSION = 2
# magic, version, tensor count, tag length, reserved, original (H, W), input (h, w)
_HEADER = struct.Struct("<4sBBBBIIII")
_ENTRY = struct.Struct("<BBBB")  # name length, dtype code, rank, reserved
_DIM = struct.Struct("<I")
HEADER_SIZE = _HEADER.size
ALIGN = 16
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


class ForeignBlob(ValueError):
    """A whole blob, written for another architecture than the reader's: a miss, not damage."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _padding(offset: int) -> int:
    return -offset % ALIGN


def encode_blob(embedding: ImageEmbedding, architecture: str) -> bytes:
    tag = architecture.encode("ascii")
    if not 0 < len(embedding.tensors) < 256 or len(tag) > 255:
        raise ValueError("an embedding blob holds 1 to 255 tensors and a tag of at most 255 characters")
    table, arrays = [], []
    for name, tensor in embedding.tensors.items():
        code = _CODES.get(tensor.dtype)
        if code is None:
            raise ValueError(f"cannot store {tensor.dtype} tensors; the cache holds float16 or float32")
        array = tensor.detach().to("cpu").contiguous().numpy().astype(_DTYPES[code][1], copy=False)
        label = name.encode("ascii")
        if not 0 < len(label) < 256 or not 1 <= array.ndim <= _MAX_NDIM:
            raise ValueError(f"tensor {name!r}: names are 1-255 characters, ranks 1-{_MAX_NDIM}")
        table.append(_ENTRY.pack(len(label), code, array.ndim, 0))
        table.extend(_DIM.pack(d) for d in array.shape)
        table.append(label)
        arrays.append(array)
    sizes = (*embedding.original_size, *embedding.input_size)
    parts = [_HEADER.pack(MAGIC, VERSION, len(arrays), len(tag), 0, *sizes), tag, *table]
    offset = sum(len(p) for p in parts)
    for array in arrays:
        parts.append(bytes(_padding(offset)))
        offset += _padding(offset)
        parts.append(array.tobytes())
        offset += array.nbytes
    return b"".join(parts)


def decode_blob(blob: bytes, architecture: str) -> ImageEmbedding:
    """The embedding on the CPU. CorruptBlob when the bytes do not check out; ForeignBlob when they are a
    whole blob of another architecture than `architecture`."""
    if len(blob) < _HEADER.size:
        raise CorruptBlob(f"{len(blob)} bytes is shorter than the header")
    magic, version, count, tag_length, _, height, width, in_h, in_w = _HEADER.unpack_from(blob)
    if magic != MAGIC or version != VERSION:
        raise CorruptBlob(f"not a version-{VERSION} embedding blob (magic {magic!r}, version {version})")
    if count == 0 or min(height, width, in_h, in_w) == 0:
        raise CorruptBlob("no tensors or a zero image size")
    if not isinstance(blob, bytes):  # a mutable buffer could change under the cache: take a private copy
        blob = bytes(blob)
    offset = _HEADER.size + tag_length
    tag = blob[_HEADER.size : offset]
    entries: list[tuple[str, int, tuple[int, ...]]] = []
    try:
        for _ in range(count):
            name_length, code, ndim, _ = _ENTRY.unpack_from(blob, offset)
            offset += _ENTRY.size
            if code not in _DTYPES or not 1 <= ndim <= _MAX_NDIM or name_length == 0:
                raise CorruptBlob(f"unknown dtype code {code}, rank {ndim} or an empty name")
            shape = tuple(_DIM.unpack_from(blob, offset + i * _DIM.size)[0] for i in range(ndim))
            offset += ndim * _DIM.size
            name = blob[offset : offset + name_length].decode("ascii")
            offset += name_length
            entries.append((name, code, shape))
    except (struct.error, UnicodeDecodeError) as exc:
        raise CorruptBlob(f"truncated or damaged tensor table: {exc}") from None
    if len(tag) != tag_length or len({name for name, _, _ in entries}) != count:
        raise CorruptBlob("truncated tag or repeated tensor names")
    tensors: dict[str, torch.Tensor] = {}
    for name, code, shape in entries:
        torch_dtype, np_dtype = _DTYPES[code]
        offset += _padding(offset)
        size = math.prod(shape) * np_dtype.itemsize
        if 0 in shape or offset + size > len(blob):
            raise CorruptBlob(f"{len(blob)} bytes cannot hold tensor {name!r} of shape {shape} at {offset}")
        # No copy: the tensor keeps the immutable bytes alive and reads them in place (nothing writes cached
        # features). A 2 MiB copy costs ~2 ms of page faults when glibc unmaps large blocks
        # (server/ops/allocator.py).
        tensors[name] = torch.frombuffer(blob, dtype=torch_dtype, count=math.prod(shape), offset=offset).view(
            shape
        )
        offset += size
    if offset != len(blob):
        raise CorruptBlob(f"{len(blob) - offset} bytes after the last tensor")
    if tag != architecture.encode("ascii"):
        raise ForeignBlob(
            f"written for architecture {tag.decode('ascii', 'replace')!r}, not {architecture!r}"
        )
    return ImageEmbedding(tensors, original_size=(height, width), input_size=(in_h, in_w))
