"""Image-space metrics used both while training (autoencoder, decoder) and by evaluation/.

Both are torchmetrics' implementations, called per image on the [0, 1] scale. torchmetrics is
imported on first use: importing it loads torchvision's models and torch._dynamo, seconds that a
command which never scores an image should not pay.
"""

from __future__ import annotations

import torch

PSNR_MAX_DB = 100.0  # the PSNR of identical images (MSE 0), which would otherwise be inf


def _unit_range(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Images in [-1, 1] on the [0, 1] scale, clamped to it first."""
    return (x.to(dtype).clamp(-1, 1) + 1) / 2


def _check_pair(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"{name} needs two batches of the same shape (B, C, H, W), got {tuple(x.shape)} and {tuple(y.shape)}"
        )


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images (B, C, H, W) in [-1, 1], on the [0, 1] scale: (B,) float32.

    PSNR = 10 log10(1 / MSE) per image, both images clamped to the valid range first; identical
    images score PSNR_MAX_DB. Raises ValueError when the shapes differ or are not (B, C, H, W).
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _check_pair("psnr", x, y)
    db = peak_signal_noise_ratio(
        _unit_range(x, torch.float32), _unit_range(y, torch.float32), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )
    return db.clamp(max=PSNR_MAX_DB)


def ssim(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004, eq. 13) of images (B, C, H, W) in [-1, 1], on the [0, 1] scale: (B,).

    Local means, variances and covariance under an 11x11 gaussian window (sigma 1.5), C1 = (0.01 L)^2,
    C2 = (0.03 L)^2 with L = 1, in float64; the SSIM map is averaged over pixels and channels of the
    valid region, where the window lies inside the image. Raises ValueError when the shapes differ, are
    not (B, C, H, W), or the images are smaller than the window.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair("ssim", x, y)
    pad = int(3.5 * sigma + 0.5)  # torchmetrics' gaussian window is 2 pad + 1 wide: 11 at sigma 1.5
    if min(x.shape[-2:]) < 2 * pad + 1:
        raise ValueError(f"ssim needs images of at least {2 * pad + 1}x{2 * pad + 1} pixels, got {tuple(x.shape[-2:])}")
    _, full = structural_similarity_index_measure(
        _unit_range(x, torch.float64),
        _unit_range(y, torch.float64),
        gaussian_kernel=True,
        sigma=sigma,
        data_range=1.0,
        k1=0.01,
        k2=0.03,
        reduction="none",
        return_full_image=True,
    )
    # torchmetrics pads the images by reflection and averages the whole map; the mean over the valid
    # region, as in Wang et al.'s reference code, keeps the border out and the figures as they were.
    return full[..., pad:-pad, pad:-pad].flatten(1).mean(1).float()
