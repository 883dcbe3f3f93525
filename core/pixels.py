"""Pixels between the model's range and 8-bit: images in [-1, 1] <-> uint8 in [0, 255].

In core because every part writes or reads images this way (grids, PNGs, shards, evaluation).
Batches from the data reader stay uint8 until they reach the device (`from_uint8_to`).
"""

from __future__ import annotations

from functools import cache

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> uint8 in [0, 255], rounding the way PNG writers do."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@cache
def _levels(device: torch.device) -> torch.Tensor:
    """(256,) float32: level v -> v / 127.5 - 1, computed on the host and copied to `device` once.

    A table, not the arithmetic on the device: CUDA divides by a scalar as a multiplication by its
    reciprocal, which gives other last bits for 111 of the 256 levels; the table gives every device
    the host's floats.
    """
    with torch.inference_mode(False):  # a plain tensor, usable outside inference mode later
        return torch.arange(256, dtype=torch.float32).div_(127.5).sub_(1.0).to(device)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] (any shape, any device) -> float32 in [-1, 1] there, x / 127.5 - 1 (IEEE float32
    division then subtraction, the same bits on every device); to_uint8 inverts it exactly.

    Raises TypeError for anything but uint8 (floats already converted included).
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"from_uint8 expects uint8 pixels, got {images.dtype}")
    return torch.take(_levels(images.device), images.long())  # a new tensor of images' shape


def from_uint8_to(pixels: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 pixels (any shape, e.g. a reader batch's (B, 3, H, W)) -> float32 in [-1, 1] on `device`.

    The one way a batch crosses to the device: the copy carries uint8 (a quarter of float32's bytes)
    and does not block the host (from the pinned memory the reader gives when the device is an
    accelerator, it overlaps the host's next work); the conversion runs on the device. Raises
    TypeError for anything but uint8.
    """
    if pixels.dtype != torch.uint8:
        raise TypeError(f"from_uint8_to expects uint8 pixels, got {pixels.dtype}")
    return from_uint8(pixels.to(device, non_blocking=True))
