"""Image files with exact contents for the tests: encoded images, 16-bit PGM, bare PNG headers, EXIF blocks."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def pgm16(values: list[int]) -> bytes:
    """A 1 x len(values) 16-bit PGM (Pillow opens it in mode I)."""
    return f"P5\n{len(values)} 1\n65535\n".encode() + np.array(values, ">u2").tobytes()


def png_header_only(width: int, height: int) -> bytes:
    """An RGB PNG whose header says width x height, followed by a few bytes of pixel data: never decodable."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _exif(entries: list[bytes], extra: bytes = b"") -> bytes:
    """A little-endian EXIF block: one IFD of 12-byte `entries` at offset 8, then `extra` (at 8 + 2 + 12n + 4)."""
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd + extra


def _orientation(value: int) -> bytes:
    return struct.pack("<HHII", 0x0112, 3, 1, value)  # SHORT


def exif_jpeg(image: Image.Image, orientation: int, **kwargs) -> bytes:
    return encoded(image, "JPEG", exif=_exif([_orientation(orientation)]), **kwargs)


def bad_exif_jpeg(corrupt_but_readable: bool = False) -> bytes:
    """A JPEG whose EXIF makes Pillow's exif_transpose raise (DateTime stored as a RATIONAL: AttributeError).

    corrupt_but_readable: a GPS IFD pointing at garbage instead, which Pillow only warns about.
    """
    data_offset = 8 + 2 + 12 * 2 + 4
    if corrupt_but_readable:
        entries, extra = [_orientation(6), struct.pack("<HHII", 0x8825, 4, 1, data_offset)], b"\xff" * 20
    else:
        entries, extra = [_orientation(6), struct.pack("<HHII", 0x0132, 5, 1, data_offset)], struct.pack("<II", 0, 0)
    return encoded(Image.new("RGB", (4, 2), (10, 20, 30)), "JPEG", exif=_exif(entries, extra))
