"""Raw image bytes → content id and an upright RGB uint8 array, refusing bad input with a clear ApiError.

Conventions (documented in the README):
- The image id is the sha256 of the raw bytes, computed before decoding, so a cache hit never decodes.
  The pixel id is the sha256 of the decoded pixels: one picture sent as its original JPEG (CVAT's Nuclio
  calls, prefetch) and re-encoded as PNG (CVAT's AI agents) has two image ids and one pixel id.
- EXIF orientation is applied: coordinates refer to the image as browsers and CVAT display it.
- Alpha is dropped, palette/CMYK/grayscale become RGB, 16-bit samples are scaled to 8 bits,
  32-bit integer and float images are min-max stretched. Multi-frame files use their first frame.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from pi_heif import register_heif_opener
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from server.errors import ApiError
from server.ops.request_context import note_content_hash

# Our own pixel limit is checked before decoding; Pillow's bomb check would only duplicate it.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False
# HEIC/HEIF (phone photos). Registered here also because ultralytics patches Image.open to load this
# plugin on the first unidentified file, which fails offline when the plugin is missing.
register_heif_opener()


def image_id(data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    note_content_hash(data, digest)
    return digest


def pixel_id(image: np.ndarray) -> str:
    """The sha256 of decoded pixels and their shape (server/services/embeddings/'s aliases)."""
    digest = hashlib.sha256("x".join(map(str, image.shape)).encode())
    digest.update(memoryview(np.ascontiguousarray(image)).cast("B"))
    return digest.hexdigest()


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    if not data:
        raise ApiError(400, "empty_image", "The image is empty (0 bytes); send the file's bytes.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ApiError(
            415,
            "unsupported_image",
            "The bytes are not an image Pillow can read; send JPEG, PNG, WebP, TIFF, BMP or GIF.",
        ) from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ApiError(400, "empty_image", f"The image has a zero size ({width}x{height}).")
    if width * height > max_pixels:
        raise ApiError(
            413,
            "image_too_large",
            f"The image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels} "
            "(LABELSERVE_MAX_IMAGE_PIXELS); downscale or tile it.",
        )
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ApiError(
            400, "corrupt_image", f"The image could not be decoded ({exc}); it may be truncated or damaged."
        ) from None


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        gray = (np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8)
    elif mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        gray = ((values - low) * scale).round().astype(np.uint8)
    else:
        if mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        return np.ascontiguousarray(np.asarray(image.convert("RGB")))
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def encode_png(image: np.ndarray) -> bytes:
    """RGB pixels as PNG: lossless, so a frame sent back (to /v1/track) is the frame that was decoded."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)  # fast to write; size matters less
    return buffer.getvalue()
