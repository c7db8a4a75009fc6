"""Image bytes in and out, with one normalisation for every source.

Every image that enters the project, whatever its file format, mode or dtype,
ends up as a square (size, size, 3) uint8 RGB array: transparency is
composited on white, the largest centred square is kept, and that square is
resized with a Lanczos filter.  Models see the same pixels as float32
(N, 3, H, W) in [-1, 1] (`to_model_range`).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

# Modes whose pixels numpy reads directly; every other mode (P, CMYK, YCbCr, PA...)
# is converted by Pillow first.
_ARRAY_MODES = frozenset({"1", "L", "LA", "RGB", "RGBA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


class ImageError(ValueError):
    """An image that cannot be read; the message names the image and the fault."""


def decode_image(data: bytes, size: int, name: str) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, TIFF, BMP...) to a (size, size, 3) uint8 RGB array.

    The whole file is decoded, so a truncated file fails here rather than
    showing up as a grey band later.  Images above Pillow's
    `Image.MAX_IMAGE_PIXELS` are refused as possible decompression bombs.
    Multi-frame files (GIF, TIFF stacks) give their first frame.
    """
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"{name}: refused as a possible decompression bomb: {error}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (no format Pillow can read; first bytes {data[:8]!r})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageError(f"{name}: truncated or corrupt image data ({error})") from None
    if image.mode not in _ARRAY_MODES:
        try:
            image = image.convert("RGBA" if image.has_transparency_data else "RGB")
        except ValueError as error:
            raise ImageError(f"{name}: cannot convert mode {image.mode} to RGB ({error})") from None
    return normalise_array(np.asarray(image), size, name)


def decode_images(data: Sequence[bytes], size: int, name: str) -> np.ndarray:
    """decode_image of each of a set's encoded images: (N, size, size, 3) uint8 (N = 0 allowed)."""
    images = [decode_image(item, size, f"{name} image {i}") for i, item in enumerate(data)]
    return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)


def normalise_array(image: np.ndarray, size: int, name: str = "array") -> np.ndarray:
    """Bring one image array to (size, size, 3) uint8 RGB.

    Shapes: (H, W) and (H, W, 1) grey, (H, W, 2) grey + alpha, (H, W, 3) RGB,
    (H, W, 4) RGBA; alpha is composited on white.
    Values, by dtype: bool is 0/255; uint8 is kept; uint16 spans the full
    16-bit range (divided by 257); other integers must lie in [0, 255] (kept)
    or [0, 65535] (divided by 257); floats must lie in [0, 1] (times 255) or
    [0, 255] (kept).
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    pixels = _to_rgb(_to_uint8(np.asarray(image), name), name)
    return _square(pixels, int(size))


def encode_png(image: np.ndarray) -> bytes:
    """Encode a (H, W, 3) uint8 array as PNG bytes (lossless; compress_level 1 for speed)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"encode_png takes (H, W, 3) uint8, got {image.shape} {image.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def to_model_range(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1], the form the models consume."""
    return images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def from_model_range(x: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) float in [-1, 1] (clipped) -> (N, H, W, 3) uint8; inverts `to_model_range` exactly."""
    pixels = np.rint((np.clip(x, -1.0, 1.0) + 1.0) * 127.5)
    return pixels.astype(np.uint8).transpose(0, 2, 3, 1)


def contact_sheet(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    per_class: int = 8,
    scale: int | None = None,
) -> Path:
    """Write a PNG grid: one row per class, its name at the left, its first `per_class` images.

    images: (N, H, W, 3) uint8; labels: (N,) indices into class_names.
    scale: integer nearest-neighbour magnification; None picks the smallest
    that makes cells at least 64 px.  The file appears atomically.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    side = images.shape[1]
    scale = scale if scale is not None else max(1, -(-64 // side))
    cell, gap = side * scale, 2
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max((probe.textlength(name, font=font) for name in class_names), default=0)
    left = int(text_width) + 4 * gap
    sheet = Image.new("RGB", (left + per_class * (cell + gap), len(class_names) * (cell + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for row, name in enumerate(class_names):
        top = gap + row * (cell + gap)
        text_height = draw.textbbox((0, 0), name, font=font)[3]
        draw.text((2 * gap, top + (cell - text_height) // 2), name, fill="black", font=font)
        for column, index in enumerate(np.flatnonzero(labels == row)[:per_class]):
            tile = images[index].repeat(scale, axis=0).repeat(scale, axis=1)
            sheet.paste(Image.fromarray(tile), (left + column * (cell + gap), top))
    return _save_atomic(sheet, Path(path))


def _to_uint8(image: np.ndarray, name: str) -> np.ndarray:
    """Map values to uint8 by the rules in `normalise_array`; the shape is unchanged."""
    if image.size == 0:
        raise ImageError(f"{name}: empty image, shape {image.shape}")
    kind = image.dtype.kind
    if kind == "b":
        return image.astype(np.uint8) * np.uint8(255)
    if image.dtype == np.uint8:
        return image
    if kind in "ui":
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > 65535:
            raise ImageError(f"{name}: integer values {low}..{high} fit neither 8 nor 16 bits")
        if (kind == "u" and image.dtype.itemsize == 2) or high > 255:
            return np.rint(image / 257.0).astype(np.uint8)
        return image.astype(np.uint8)
    if kind == "f":
        low, high = float(np.min(image)), float(np.max(image))
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0.0 or high > 255.0:
            raise ImageError(f"{name}: float values {low}..{high} lie in neither [0, 1] nor [0, 255]")
        return np.rint(image * 255.0 if high <= 1.0 else image).astype(np.uint8)
    raise ImageError(f"{name}: unsupported dtype {image.dtype}")


def _to_rgb(image: np.ndarray, name: str) -> np.ndarray:
    """(H, W), (H, W, 1|2|3|4) uint8 -> (H, W, 3) uint8, alpha composited on white."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
        raise ImageError(f"{name}: shape {image.shape} is not (H, W) or (H, W, 1|2|3|4)")
    channels = image.shape[-1]
    if channels in (2, 4):
        alpha = image[..., -1:].astype(np.float32) / 255.0
        image = np.rint(image[..., :-1] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image)


def _square(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop (H, W, 3) to its largest square and resize to (size, size, 3) with Lanczos."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = image[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(crop)
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.LANCZOS))


def _save_atomic(image: Image.Image, path: Path) -> Path:
    """Save as PNG through a temporary sibling and os.replace, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
