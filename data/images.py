"""Image files -> RGB pixels: the one conversion used by the data commands, the shard reader and `fid`
(uint8 pixels <-> the [-1, 1] floats the networks see is core/pixels.py).

    image = load_rgb(path_or_bytes, resolution=64)     # RGB, 64 x 64, or raises BadImage

Every Pillow mode a folder can hold comes out as the RGB values it means (documented in the
docs/data.md, Image modes):

- 1, L, P, RGB, CMYK, YCbCr, LAB, HSV: Pillow's own conversion to RGB.
- Alpha (LA, La, PA, RGBA, RGBa, P or L or RGB with a transparency key) is composited on
  BACKGROUND (white): a transparent pixel becomes white, a half-transparent one half white.
- 16-bit greyscale (I;16, I;16L, I;16B, I;16N) is scaled, 65535 -> 255 (v / 257, rounded), not
  clipped. Mode I (32-bit integers, how Pillow reads 16-bit PGM files) is read on the same
  0..65535 scale, values outside it clipped. Mode F (32-bit float) is read as 0..1 when all its
  values lie in [0, 1], else as 0..255; values outside are clipped, NaN becomes 0. A
  transparency key on these modes (a 16-bit PNG's tRNS) turns that grey level into BACKGROUND.
- Multi-frame files (animated GIF, multi-page TIFF) give their first frame.
- The EXIF orientation is applied.

Anything else, and any error at all on one image (a truncated file, malformed EXIF that makes
Pillow's exif_transpose raise, an unknown mode), raises BadImage with a short reason, so the
caller can skip the image, count it and name it. Images over `max_pixels` are refused from their
header, before decoding, with the reason "larger than N pixels"; Pillow's own warnings
(decompression-bomb warnings for large images, corrupt-EXIF warnings) are not printed: they are
counted in `notes` instead, so they never bury a progress bar.
"""

from __future__ import annotations

import io
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# PIL's BICUBIC scales its kernel with the downscale factor, so shrinking is antialiased.
RESAMPLE = Image.Resampling.BICUBIC
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited on
# Pillow warns above MAX_IMAGE_PIXELS (89,478,485) and refuses above twice that; we refuse at the
# same point by default, from the header, and let `--max-pixels` move it.
LARGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
DEFAULT_MAX_PIXELS = 2 * LARGE_PIXELS
# Image files the folder source and `fid` read (lower case); shards may hold the same types.
IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".avif",
)  # fmt: skip
LARGE_NOTE = f"over {LARGE_PIXELS:,} pixels (read anyway)"
WARNING_NOTE = "Pillow warning (e.g. corrupt EXIF), image read anyway"

_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_PILLOW_RGB_MODES = ("1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV")


class BadImage(ValueError):
    """One image that cannot become a sample; `reason` is short and the same for every such image."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason + (f" ({detail})" if detail else ""))
        self.reason = reason


def load_rgb(
    source: str | os.PathLike | bytes,
    resolution: int | None = None,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    notes: Counter | None = None,
) -> Image.Image:
    """Decode a file (path or bytes) into an RGB image, center-cropped and resized to R x R when given.

    Raises BadImage (reason "unreadable image", "larger than N pixels", "unsupported image mode
    X") for anything that goes wrong; `notes` (when given) counts large images and Pillow
    warnings that did not stop the image. max_pixels=None removes the size limit.
    """
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1 (or None for no limit), got {max_pixels}")
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else Path(source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Our limit below replaces Pillow's, checked from the header alike. Pillow reads its limit
        # from this module global; it is restored at once (one image at a time per process).
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(fp) as image:
                w, h = image.size
                if max_pixels is not None and w * h > max_pixels:
                    raise BadImage(f"larger than {max_pixels:,} pixels", f"{w} x {h}")
                image.load()  # Image.open stands on the first frame of an animated GIF or multi-page TIFF
                rgb = to_rgb(ImageOps.exif_transpose(image))
            if resolution is not None:
                rgb = fit_square(rgb, resolution)
        except BadImage:
            raise
        except Exception as e:  # noqa: BLE001 - any error on one image skips that image, whatever raised it
            raise BadImage("unreadable image", f"{type(e).__name__}: {e}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    if notes is not None:
        if w * h > LARGE_PIXELS:
            notes[LARGE_NOTE] += 1
        if any(issubclass(c.category, UserWarning) for c in caught):
            notes[WARNING_NOTE] += 1
    return rgb


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB image with the values `image` means in its mode (module docstring); raises BadImage for other modes."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _wide_gray_to_rgb(image)
    if mode in _ALPHA_MODES or image.has_transparency_data:
        rgba = image.convert("RGBA")  # also un-premultiplies La/RGBa and applies a palette's or key's alpha
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if mode in _PILLOW_RGB_MODES:
        return image.convert("RGB")
    raise BadImage(f"unsupported image mode {mode}")


def _wide_gray_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale scaled to 0..255 (module docstring); a transparency key -> white."""
    values = np.asarray(image).astype(np.float64)  # (H, W); I;16B arrives big-endian and is read as such
    key = image.info.get("transparency")
    if image.mode == "F":
        values = np.nan_to_num(values, nan=0.0)
        top = 1.0 if values.size and values.min() >= 0 and values.max() <= 1 else 255.0
    else:
        top = 65535.0
    gray = np.round(np.clip(values, 0, top) * (255.0 / top)).astype(np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)  # (H, W, 3)
    if isinstance(key, (int, float)):
        rgb[values == key] = BACKGROUND  # a PNG tRNS key: that grey level is transparent
    return Image.fromarray(rgb)


def fit_square(image: Image.Image, resolution: int) -> Image.Image:
    """Center-crop the largest square, then resize it to resolution x resolution.

    Cropping first means a very long or wide image costs memory for its central square only,
    never for a resized copy of its whole long side; pixels outside the square never bleed in.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    w, h = image.size
    if (w, h) == (resolution, resolution):
        return image
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return square if side == resolution else square.resize((resolution, resolution), RESAMPLE)


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
