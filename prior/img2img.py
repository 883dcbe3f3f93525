"""img2img (SDEdit) and inpainting: the image and mask read at the run's resolution, the known region kept.

SDEdit (Meng et al. 2022, §3.2): encode the image, noise its latent z_init to an intermediate
level, z = sqrt(abar) z_init + sqrt(1 - abar) eps, and run the sampler from there. The strength S
in [0, 1] sets the level: the sampler's levels start at timestep S T - 1 (spacing.Spacing.levels'
t_start, the same for every sampler and spacing) and z is noised to the first of them, abars[0].
S = 1 is text-to-image (z is the pure noise eps, the image unused); S = 0 runs no step and returns
the image's reconstruction, decode(encode(x)).

Inpainting (white = repaint): the mask is read at the run's resolution and max-pooled to the latent
grid (f x f pixels -> one latent; any repainted pixel repaints its latent, so no pixel to repaint
is left in a kept latent). In the kept latents the denoiser's x0_hat is z_init itself and eps_hat
the noise the state holds there, (z_t - sqrt(abar_t) z_init) / sqrt(1 - abar_t): every step then
moves the kept region to z_init noised to the next level (the replacement of the known region at
every step, done inside the denoiser so one- and multistep, deterministic and stochastic samplers
alike land on it), and the last step lands on z_init, which is pasted in exactly at the end. The
decoded kept region equals the autoencoder's reconstruction there, up to the decoder's receptive
field across the mask's edge.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from latentdiff.core.pixels import from_uint8
from latentdiff.data.images import BadImage, load_rgb

from .denoiser import Denoiser
from .schedule import NoiseSchedule

MASK_THRESHOLD = 128  # a mask pixel whose grey level (mean of R, G, B) is at least this is repainted


def _read(path: str | os.PathLike, resolution: int, what: str) -> np.ndarray:
    """(R, R, 3) uint8 pixels of an image file through the project's one loader (data.images.load_rgb)."""
    if not Path(path).is_file():
        raise ValueError(f"{what} {path} does not exist")
    try:
        return np.asarray(load_rgb(path, resolution))
    except BadImage as e:
        raise ValueError(f"{what} {path}: {e}") from None


def load_image(path: str | os.PathLike, resolution: int) -> Tensor:
    """The image at `path`, center-cropped and resized to resolution x resolution: (1, 3, R, R) in [-1, 1].

    Raises ValueError naming the file when it is missing or unreadable.
    """
    pixels = torch.from_numpy(_read(path, resolution, "init image").copy())
    return from_uint8(pixels).permute(2, 0, 1)[None]


def load_mask(path: str | os.PathLike, resolution: int, downsampling: int) -> tuple[Tensor, Tensor]:
    """(pixel mask (1, 1, R, R), latent mask (1, 1, R/f, R/f)) of a mask image, 1.0 = repaint, 0.0 = keep.

    A pixel is repainted when its grey level is >= MASK_THRESHOLD (white); the latent mask is the
    pixel mask max-pooled over f x f blocks. Raises ValueError when the mask repaints nothing.
    """
    grey = _read(path, resolution, "mask").astype(np.float32).mean(axis=2)  # (R, R)
    pixel = torch.from_numpy((grey >= MASK_THRESHOLD).astype(np.float32))[None, None]
    if not pixel.any():
        raise ValueError(f"mask {path} has no white (repaint) pixel: nothing to inpaint")
    return pixel, F.max_pool2d(pixel, downsampling)


def start_timestep(strength: float, T: int) -> float | None:
    """The sampler's first timestep for strength S in (0, 1]: S T - 1, None (the full range) at S = 1."""
    return None if strength == 1.0 else strength * T - 1


def noised(z_init: Tensor, eps: Tensor, abar: float) -> Tensor:
    """z = sqrt(abar) z_init + sqrt(1 - abar) eps (DDPM eq. 4); abar = 0 is eps itself."""
    return math.sqrt(abar) * z_init + math.sqrt(1 - abar) * eps


def keep_known(denoiser: Denoiser, z_init: Tensor, mask: Tensor, schedule: NoiseSchedule) -> Denoiser:
    """The denoiser with x0_hat = z_init where mask == 0 (kept) and eps_hat consistent with z_t there.

    z_init: (B or 1, c, h, w) prior latents of the image; mask: (1 or B, 1, h, w), 1 = repaint.
    """
    keep = 1 - mask

    def inpainting(z_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        x0, _ = denoiser(z_t, t)
        x0 = mask * x0 + keep * z_init
        return x0, schedule.eps_from_x0(z_t, x0, t)

    return inpainting
