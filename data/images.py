"""Image helpers shared by the sources and the reader: RGB conversion, square fitting, PNG bytes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

# PIL's BICUBIC scales its kernel with the downscale factor, so shrinking is antialiased.
RESAMPLE = Image.Resampling.BICUBIC


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image`; transparent pixels become white rather than whatever colour they hide."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def fit_square(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution`, then center-crop to resolution x resolution."""
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    w, h = image.size
    if (w, h) == (resolution, resolution):
        return image
    scale = resolution / min(w, h)
    # max(...) so rounding never leaves a side shorter than the crop.
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((new_w, new_h), RESAMPLE)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def png_bytes(image: Image.Image) -> bytes:
    """Lossless PNG encoding; the same pixels always give the same bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def gray_to_rgb(pixels: np.ndarray) -> Image.Image:
    """(H, W) uint8 grayscale array -> RGB image with three equal channels."""
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"expected a (H, W) uint8 array, got {pixels.shape} {pixels.dtype}")
    return Image.fromarray(np.repeat(pixels[:, :, None], 3, axis=2))
