"""Guided sampling of the prior's latents: the UNet as model(z_t, t, c), the z_0 clip bound, the sampler run."""

from __future__ import annotations

from collections.abc import Callable

import torch

from latentdiff.core.latent_space import LatentSpace

from .binding import Group, binding_denoiser
from .config import DiffusionConfig
from .denoiser import Generators, Walk, noise
from .guidance import Interval, cfg_model_fn, in_interval
from .img2img import keep_known, noised, sample_repaint
from .samplers import levels, make_denoiser, sample
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
def sample_latents(
    unet: UNet,
    schedule: NoiseSchedule,
    prediction: str,
    cond: Conditioning,
    uncond: Conditioning,
    shape: tuple[int, int, int],
    *,
    sampler: str,
    steps: int,
    guidance: float,
    guidance_rescale: float = 0.0,
    guidance_interval: Interval | None = None,
    generator: Generators,
    clip_x0: float | None,
    callback=None,
    dtype: torch.dtype | None = None,
    z_init: torch.Tensor | None = None,
    t_start: float | None = None,
    mask: torch.Tensor | None = None,
    resample: int = 1,
    binding: float = 0.0,
    binding_until: float = 0.5,
    groups: list[list[Group]] | None = None,
    **options,
) -> torch.Tensor:
    """z_0 (B, *shape) in prior units for each row of `cond`, classifier-free guided against `uncond`.

    guidance_rescale: phi of Lin et al. 2024 §3.4 (prior.guidance.cfg_model_fn); 0 is plain guidance.
    guidance_interval: (sigma_lo, sigma_hi), guide only where the VE sigma(t) lies in (sigma_lo, sigma_hi]
    (Kynkäänniemi et al. 2024; prior.guidance.in_interval); None: at every step.
    generator: one for the batch, or one per row (row k's z_T and every noise draw of the sampler
    then come from generator k alone: the row's result does not depend on the batch).
    dtype: autocast dtype for the network (runtime.sampling_dtype), None for float32.
    z_init (B or 1, *shape), prior latents of an image: with t_start, SDEdit starts from z_init noised
    to the first level (img2img.py); with mask ((1 or B, 1, h, w), 1 = repaint) the rest keeps z_init.
    resample: U > 1 runs RePaint's steps instead of the sampler's (img2img.sample_repaint; sampler ddpm).
    binding > 0: attention binding (prior/binding.py) of each row's named objects (groups: binding.caption_groups
    per row) with that step, at t >= binding_until * T.
    """
    B = cond[0].shape[0]
    device = cond[0].device
    z = noise(torch.empty((B, *shape), device=device), generator)  # z_T: each row's first draw
    if t_start is not None:
        z = noised(z_init, z, levels(sampler, schedule, steps, t_start, **options).abars[0])
    guided = None if guidance_interval is None else in_interval(schedule.sigma, guidance_interval)
    model_fn = cfg_model_fn(unet_model(unet, dtype), cond, uncond, guidance, guidance_rescale, guided)
    denoiser = make_denoiser(model_fn, schedule, prediction, clip_x0)
    if binding and groups is not None:
        denoiser = binding_denoiser(
            denoiser, unet, cond, groups, schedule, binding, binding_until * schedule.T, dtype=dtype
        )
    if mask is not None:
        denoiser = keep_known(denoiser, z_init, mask, schedule)
    if resample > 1:
        walk = Walk(schedule, levels(sampler, schedule, steps, t_start, **options), generator, callback)
        z0 = sample_repaint(denoiser, z, walk, resample=resample)
    else:
        z0 = sample(
            sampler, denoiser, z, schedule, steps, generator=generator, callback=callback, t_start=t_start, **options
        )
    return z0 if mask is None else mask * z0 + (1 - mask) * z_init
