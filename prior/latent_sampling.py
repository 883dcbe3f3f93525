"""Guided sampling of the prior's latents: the UNet as model(z_t, t, c), the z_0 clip bound, the sampler run."""

from __future__ import annotations

from typing import Callable

import torch

from latentdiff.core.latent_space import LatentSpace

from .config import DiffusionConfig
from .guidance import cfg_model_fn
from .samplers import make_denoiser, sample
from .schedule import NoiseSchedule
from .text_conditioning import Conditioning
from .unet import UNet


def unet_model(unet: torch.nn.Module, dtype: torch.dtype | None = None) -> Callable:
    """model(z_t, t, c) over the UNet, the form guidance and the samplers take.

    dtype: run the network under autocast to it (e.g. bf16) and return float32, so the sampler's
    update arithmetic keeps full precision.
    """
    if dtype is None:
        return lambda z_t, t, c: unet(z_t, t, c[0], c[1], c[2])

    def model(z_t, t, c):
        with torch.autocast(z_t.device.type, dtype=dtype):
            return unet(z_t, t, c[0], c[1], c[2]).float()

    return model


def clip_bound(cfg: DiffusionConfig, space: LatentSpace) -> float | None:
    """Where predicted z_0 is clamped while sampling, in prior units (None: nowhere); see DiffusionConfig.clip_x0."""
    if cfg.clip_x0 == "off":
        return None
    if cfg.clip_x0 == "latent":
        return space.absmax
    return float(cfg.clip_x0)


@torch.no_grad()
def sample_latents(unet: UNet, schedule: NoiseSchedule, prediction: str, cond: Conditioning, uncond: Conditioning,
                   shape: tuple[int, int, int], *, sampler: str, steps: int, guidance: float,
                   guidance_rescale: float = 0.0,
                   generator: torch.Generator, clip_x0: float | None, callback=None, dtype: torch.dtype | None = None,
                   **options) -> torch.Tensor:
    """z_0 (B, *shape) in prior units for each row of `cond`, classifier-free guided against `uncond`.

    guidance_rescale: phi of Lin et al. 2024 §3.4 (prior.guidance.cfg_model_fn); 0 is plain guidance.
    dtype: autocast dtype for the network (runtime.sampling_dtype), None for float32.
    """
    B = cond[0].shape[0]
    device = cond[0].device
    z_T = torch.randn((B, *shape), generator=generator, device=device)
    model_fn = cfg_model_fn(unet_model(unet, dtype), cond, uncond, guidance, guidance_rescale)
    denoiser = make_denoiser(model_fn, schedule, prediction, clip_x0)
    return sample(sampler, denoiser, z_T, schedule, steps, generator=generator, callback=callback, **options)
