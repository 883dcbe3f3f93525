"""Image-space metrics used both while training (autoencoder, decoder) and by evaluation/."""

from __future__ import annotations

import torch


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [-1, 1], on the [0, 1] scale: (B,).

    PSNR = 10 log10(1 / MSE), both images clamped to the valid range first.
    """
    x01 = (x.float().clamp(-1, 1) + 1) / 2
    y01 = (y.float().clamp(-1, 1) + 1) / 2
    mse = (x01 - y01).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10.0 * torch.log10(mse)
