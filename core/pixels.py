"""Pixels between the model's range and 8-bit: images in [-1, 1] <-> uint8 in [0, 255].

In core because every part writes or reads images this way (grids, PNGs, shards, evaluation).
"""

from __future__ import annotations

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> uint8 in [0, 255], rounding the way PNG writers do."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] (any shape) -> float32 in [-1, 1], x / 127.5 - 1; to_uint8 inverts it exactly."""
    if images.dtype != torch.uint8:
        raise TypeError(f"from_uint8 expects uint8 pixels, got {images.dtype}")
    return images.float().div_(127.5).sub_(1.0)  # .float() copies, so the in-place ops never touch the input
