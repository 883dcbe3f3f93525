"""data/images.py: every Pillow mode to the right RGB values, one bad image never stops the rest, pixel limits.

Builders of image bytes with exact contents (PNG chunks, EXIF blocks) live in tests/image_files.py.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from latentdiff.data import images
from latentdiff.data.images import BACKGROUND, BadImage, fit_square, load_rgb, to_rgb
from tests.image_files import bad_exif_jpeg, encoded, exif_jpeg, pgm16, png_header_only  # noqa: E402


def _pixels(image: Image.Image) -> list[tuple[int, int, int]]:
    assert image.mode == "RGB"
    return [tuple(int(v) for v in p) for p in np.asarray(image).reshape(-1, 3)]


def _row(mode: str, values: list) -> Image.Image:
    """A 1 x len(values) image of `mode` holding `values` left to right."""
    image = Image.new(mode, (len(values), 1))
    for x, v in enumerate(values):
        image.putpixel((x, 0), v)
    return image


def _palette(transparent: int | None = None) -> Image.Image:
    image = _row("P", [0, 1, 2])
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    if transparent is not None:
        image.info["transparency"] = transparent
    return image


# Composited on white: a * fg + (1 - a) * 255, rounded by Pillow's integer blend (+-1).
def _over_white(fg: int, alpha: int) -> int:
    return round(fg * alpha / 255 + BACKGROUND[0] * (1 - alpha / 255))


MODES = {
    "1": (_row("1", [0, 1]), [(0, 0, 0), (255, 255, 255)]),
    "L": (_row("L", [0, 77, 255]), [(0, 0, 0), (77, 77, 77), (255, 255, 255)]),
    "LA": (_row("LA", [(200, 0), (200, 255), (0, 128)]),
           [(255, 255, 255), (200, 200, 200), (_over_white(0, 128),) * 3]),
    "P": (_palette(), [(255, 0, 0), (0, 255, 0), (0, 0, 255)]),
    "P with transparency": (_palette(transparent=1), [(255, 0, 0), (255, 255, 255), (0, 0, 255)]),
    "RGB": (_row("RGB", [(10, 20, 30), (250, 128, 0)]), [(10, 20, 30), (250, 128, 0)]),
    "RGBA": (_row("RGBA", [(10, 20, 30, 0), (10, 20, 30, 255), (0, 100, 200, 128)]),
             [(255, 255, 255), (10, 20, 30), (_over_white(0, 128), _over_white(100, 128), _over_white(200, 128))]),
    "CMYK": (_row("CMYK", [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255), (0, 255, 255, 0)]),
             [(255, 255, 255), (0, 255, 255), (0, 0, 0), (255, 0, 0)]),
    "YCbCr": (_row("YCbCr", [(128, 128, 128), (0, 128, 128), (255, 128, 128)]),
              [(128, 128, 128), (0, 0, 0), (255, 255, 255)]),
    "HSV": (_row("HSV", [(0, 255, 255), (85, 255, 255), (0, 0, 200)]), [(255, 0, 0), (0, 255, 0), (200, 200, 200)]),
    "LAB": (_row("LAB", [(255, 128, 128), (0, 128, 128)]), [(255, 255, 255), (0, 0, 0)]),
    # 16-bit: scaled by 257 (65535 -> 255), never clipped at 255
    "I;16": (_row("I;16", [0, 257, 32896, 65535]), [(0,) * 3, (1,) * 3, (128,) * 3, (255,) * 3]),
    "I;16L": (_row("I;16L", [0, 257, 32896, 65535]), [(0,) * 3, (1,) * 3, (128,) * 3, (255,) * 3]),
    "I;16B": (_row("I;16B", [0, 257, 32896, 65535]), [(0,) * 3, (1,) * 3, (128,) * 3, (255,) * 3]),
    # 32-bit integers on the same 0..65535 scale, clipped outside it
    "I": (_row("I", [-5, 0, 32896, 65535, 70000]), [(0,) * 3, (0,) * 3, (128,) * 3, (255,) * 3, (255,) * 3]),
    # floats: 0..1 when every value is in [0, 1], else 0..255; NaN -> 0
    "F in [0, 1]": (_row("F", [0.0, 0.5, 1.0]), [(0,) * 3, (128,) * 3, (255,) * 3]),
    "F in [0, 255]": (_row("F", [0.0, 100.0, 300.0, float("nan")]), [(0,) * 3, (100,) * 3, (255,) * 3, (0,) * 3]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MODES))
def test_every_mode_gives_the_rgb_values_it_means(name: str):
    image, expected = MODES[name]
    got = _pixels(to_rgb(image))
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1)  # +-1: Pillow's integer rounding
    if name in ("1", "L", "P", "RGB", "CMYK") or name.startswith("I"):
        assert got == expected  # no blending or colour maths: exact


def test_a_16_bit_transparency_key_is_background_and_the_rest_is_scaled():
    image = _row("I;16", [1000, 32896, 65535])
    image.info["transparency"] = 1000  # what Pillow reads from a 16-bit PNG's tRNS chunk
    assert _pixels(to_rgb(image)) == [BACKGROUND, (128, 128, 128), (255, 255, 255)]


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_a_16_bit_ramp_file_keeps_its_ramp(fmt: str):
    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16)[None, :].repeat(4, 0)  # (4, 256) 0..65535
    data = encoded(Image.fromarray(ramp), fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    got = np.asarray(load_rgb(data))
    np.testing.assert_array_equal(got[0, :, 0], np.arange(256))  # not 100% white
    # the same through a 16-bit PGM, which Pillow opens in mode I
    got = np.asarray(load_rgb(pgm16([0, 257, 32896, 65535])))
    assert got[0, :, 0].tolist() == [0, 1, 128, 255]


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_multi_frame_files_give_their_first_frame(fmt: str):
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 3
    assert set(_pixels(load_rgb(buf.getvalue()))) == {(255, 0, 0)}


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (16, 8), (255, 0, 0))
    image.paste((0, 0, 255), (8, 0, 16, 8))  # red | blue
    got = load_rgb(exif_jpeg(image, orientation=6, quality=100, subsampling=0))  # 6: turn 90 degrees clockwise
    assert got.size == (8, 16)
    top, bottom = got.getpixel((4, 3)), got.getpixel((4, 12))
    assert top[0] > 240 > top[2] and bottom[2] > 240 > bottom[0]  # red on top, blue below


def test_malformed_exif_is_a_bad_image_not_a_crash():
    with pytest.raises(BadImage) as e:
        load_rgb(bad_exif_jpeg())
    assert e.value.reason == "unreadable image" and "AttributeError" in str(e.value)


def test_any_error_is_a_bad_image(tmp_path):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    for data in [b"", b"not an image", encoded(noise, "PNG")[:400], encoded(noise, "JPEG")[:300]]:
        with pytest.raises(BadImage, match="unreadable image"):
            load_rgb(data)
    with pytest.raises(BadImage, match="unreadable image"):
        load_rgb(tmp_path / "missing.png")


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    # A 100,000 x 100,000 header with no pixel data: refused by size, never decoded (it would be unreadable).
    with pytest.raises(BadImage) as e:
        load_rgb(png_header_only(100_000, 100_000))
    assert e.value.reason == f"larger than {images.DEFAULT_MAX_PIXELS:,} pixels" == "larger than 178,956,970 pixels"
    assert "100000 x 100000" in str(e.value)
    small = encoded(Image.new("RGB", (5, 4)), "PNG")
    with pytest.raises(BadImage, match="larger than 19 pixels"):
        load_rgb(small, max_pixels=19)
    assert load_rgb(small, max_pixels=20).size == (5, 4)
    assert load_rgb(small, max_pixels=None).size == (5, 4)
    assert Image.MAX_IMAGE_PIXELS == images.LARGE_PIXELS  # Pillow's own limit is restored


def test_pillow_warnings_are_counted_not_printed(monkeypatch):
    notes = Counter()
    monkeypatch.setattr(images, "LARGE_PIXELS", 10)  # as if 5 x 4 were over Pillow's warning size
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning that escaped would fail here
        load_rgb(encoded(Image.new("RGB", (5, 4)), "PNG"), notes=notes)
        load_rgb(bad_exif_jpeg(corrupt_but_readable=True), notes=notes)  # Pillow warns "Corrupt EXIF data"
    assert notes == Counter({images.LARGE_NOTE: 1, images.WARNING_NOTE: 1})


def test_fit_square_crops_the_center_before_resizing():
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (10, 4000, 3), dtype=np.uint8))
    got = fit_square(wide, 8)
    assert got.size == (8, 8)
    centre = wide.crop((1995, 0, 2005, 10))  # the central 10 x 10 square: nothing outside it bleeds in
    np.testing.assert_array_equal(np.asarray(got), np.asarray(centre.resize((8, 8), images.RESAMPLE)))
    tall = Image.fromarray(np.asarray(wide).transpose(1, 0, 2).copy())
    tall_centre = tall.crop((0, 1995, 10, 2005))
    expected = tall_centre.resize((8, 8), images.RESAMPLE)
    np.testing.assert_array_equal(np.asarray(fit_square(tall, 8)), np.asarray(expected))
    same = Image.new("RGB", (8, 8))
    assert fit_square(same, 8) is same
    with pytest.raises(ValueError, match="resolution must be positive"):
        fit_square(same, 0)
