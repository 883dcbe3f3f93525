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
alike land on it), and the last step lands on z_init, which is pasted in exactly at the end.
Decoded, the kept region would be the autoencoder's reconstruction (tens of grey levels off on a
small autoencoder), so the image is composited in pixel space after decoding (`composite`): kept
pixels are the input's own, exactly. `feather` F fades the new pixels in over the F pixels of the
repainted region nearest the kept one (alpha d / (F + 1) at Chebyshev distance d); kept pixels stay
exact whatever F. The default is 0: the sampler already conditions the repainted latents on the kept
ones, so the seam is only the reconstruction error at the edge, and a feather brings back the pixels
the user asked to replace (at 32 px, 2 pixels are 6% of the image).

RePaint (Lugmayr et al. 2022, Alg. 1, jump length 1; `sample_repaint`): each step from level t to s
is taken U times; between two, z_s is noised back to t (q(z_t | z_s)), so the repainted region is
denoised again from a state whose known part came from the image: better seams for U x the network
evaluations. Its reverse step is DDPM's ancestral one, so it runs with the ddpm sampler.
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

from .denoiser import Denoiser, Walk, noise, t_like
from .schedule import NoiseSchedule, posterior_coefficients

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


def sample_repaint(denoiser: Denoiser, z_T: Tensor, walk: Walk, *, resample: int) -> Tensor:
    """RePaint, Lugmayr et al. 2022 Alg. 1 with jump length 1: each step taken `resample` (U) times.

    The step t -> s is DDPM's ancestral one (Alg. 2, eq. 6-7 between visited levels), with the known
    region's x0_hat from `keep_known`; before each retry z_s is noised back to t by
    q(z_t | z_s) = N(sqrt(abar_t / abar_s) z_s, (1 - abar_t / abar_s) I) (Alg. 1, line 12). No retry
    where abar_t = 0 (zero terminal SNR): noising to it forgets z_s entirely. U network evaluations a step.
    """
    lv, z = walk.levels, z_T
    for i, t in enumerate(lv.ts):
        a_t, a_s = lv.abars[i], lv.abars[i + 1]
        c_x0, c_zt, var = posterior_coefficients(a_t, a_s)
        for u in range(resample):
            x0, _ = denoiser(z, t_like(z, t))
            if u == 0:
                walk.report(i, z, x0)
            z_s = c_x0 * x0 + c_zt * z
            if var > 0:  # 0 at the jump to the data
                z_s = z_s + math.sqrt(var) * noise(z, walk.generator)
            if u == resample - 1 or a_t == 0:
                break
            z = math.sqrt(a_t / a_s) * z_s + math.sqrt(1 - a_t / a_s) * noise(z, walk.generator)
        z = z_s
    return z


def feathered(mask: Tensor, feather: int) -> Tensor:
    """alpha (1, 1, R, R): 0 on kept pixels, d / (F + 1) at Chebyshev distance d <= F from them, else 1.

    mask: the pixel mask (1, 1, R, R), 1 = repaint. feather 0 is the mask itself.
    """
    keep = 1 - mask
    near = sum(F.max_pool2d(keep, 2 * d + 1, stride=1, padding=d) for d in range(feather + 1))  # F + 1 - d
    return 1 - near / (feather + 1)


def composite(images: Tensor, init: Tensor, alpha: Tensor) -> Tensor:
    """alpha * images + (1 - alpha) * init: the decoded images (B, 3, R, R) over the input image (1, 3, R, R).

    Where alpha is 0 the result is `init` itself, bit for bit (not a blend that rounds differently).
    """
    alpha = alpha.to(images)
    return torch.where(alpha == 0, init.to(images), alpha * images + (1 - alpha) * init.to(images))
