"""The frozen stages a prior is trained with, how it records them, and guided latent sampling.

A prior is only meaningful with the autoencoder whose latent space it learned and the text
encoder whose states it attends to. Its meta.json records both (path and content hash);
loading checks them, so a retrained autoencoder is refused rather than decoded into noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from latentdiff.autoencoder.load import load_autoencoder
from latentdiff.core import checkpoint as ckpt
from latentdiff.core.checkpoint import CheckpointError
from latentdiff.text.encoder import TextEncoder
from latentdiff.text.sources import load_text_encoder

from .config import DiffusionConfig
from .guidance import cfg_model_fn
from .samplers import make_denoiser, sample
from .schedule import NoiseSchedule
from .unet import UNet

Conditioning = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (states (B,T,D), mask (B,T), pooled (B,E))


def text_conditioning(encoder: TextEncoder, prompts: list[str], length: int | None = None) -> Conditioning:
    """(states, mask, pooled) of the prompts, cut after the longest prompt's last token (or at `length`).

    Positions after every prompt's EOT are masked out of cross-attention, so cutting them gives the
    same attention output for less work: the text encoder pads to its context length (77), while
    a caption is ~10 tokens. The key and value projections and the attention scale with it.
    """
    out = encoder.encode(prompts)
    if length is None:
        length = int(out.mask.sum(dim=1).max()) if len(prompts) else out.mask.shape[1]
    return _cut(out, length)


def guided_conditioning(encoder: TextEncoder, prompts: list[str], negative: list[str]) -> tuple[Conditioning, Conditioning]:
    """Conditioning for the prompts and for their negative (or empty) prompts, cut to one length.

    Classifier-free guidance runs both halves as one batch, so they must have the same length.
    """
    cond, uncond = encoder.encode(prompts), encoder.encode(negative)
    length = int(torch.cat([cond.mask, uncond.mask]).sum(dim=1).max())
    return _cut(cond, length), _cut(uncond, length)


def _cut(out, length: int) -> Conditioning:
    return out.states[:, :length], out.mask[:, :length], out.pooled


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


def make_schedule(cfg: DiffusionConfig) -> NoiseSchedule:
    return NoiseSchedule.make(cfg.schedule, cfg.timesteps, zero_terminal_snr=cfg.zero_terminal_snr)


def text_hash(encoder: TextEncoder) -> str:
    return ckpt.tensors_hash(encoder.model.state_dict())


def load_frozen_stages(autoencoder: str | Path, text: str | Path, device: torch.device,
                       expect: dict | None = None) -> tuple[torch.nn.Module, dict, TextEncoder]:
    """(autoencoder, its meta, text encoder), frozen; checked against `expect` (a prior's meta) if given."""
    ae, ae_meta = load_autoencoder(autoencoder, device)
    encoder = load_text_encoder(str(text)).to(device)
    encoder.frozen(cache_size=4096)
    if expect is not None:
        want = expect["autoencoder"]
        if ae_meta["encoder_hash"] != want["encoder_hash"]:
            raise CheckpointError(
                f"the prior was trained on the latents of autoencoder {want['run']} (encoder hash {want['encoder_hash']}), "
                f"but {autoencoder} has encoder hash {ae_meta['encoder_hash']}: its latent space differs. "
                "Use the autoencoder the prior was trained with, or retrain the prior")
        want_text = expect["text"]
        got = text_hash(encoder)
        if got != want_text["hash"]:
            raise CheckpointError(
                f"the prior was trained with text encoder {want_text['source']} (hash {want_text['hash']}), "
                f"but {text} has hash {got}; use the text encoder the prior was trained with")
    return ae, ae_meta, encoder


def check_unet_fits(unet_cfg, ae_meta: dict, encoder: TextEncoder, where: str) -> None:
    """Clear errors for a UNet that cannot read these latents or these text states."""
    if unet_cfg.context_dim != encoder.width:
        raise CheckpointError(f"{where}: the UNet cross-attends to text width {unet_cfg.context_dim}, "
                              f"but the text encoder ({encoder.source}) produces {encoder.width}; "
                              f"--set model.context_dim={encoder.width}")
    if unet_cfg.pooled_dim and unet_cfg.pooled_dim != encoder.embed_dim:
        raise CheckpointError(f"{where}: the UNet takes a pooled text embedding of width {unet_cfg.pooled_dim}, "
                              f"but the text encoder gives {encoder.embed_dim}; --set model.pooled_dim={encoder.embed_dim}")
    if unet_cfg.in_channels != ae_meta["latent_channels"]:
        raise CheckpointError(f"{where}: the UNet has {unet_cfg.in_channels} input channels, but the autoencoder's "
                              f"latents have {ae_meta['latent_channels']}; --set model.in_channels={ae_meta['latent_channels']}")


def clip_bound(cfg: DiffusionConfig, ae_meta: dict) -> float | None:
    """Where predicted z_0 is clamped while sampling (None: nowhere)."""
    if cfg.clip_x0 == 0:
        return None
    if cfg.clip_x0 < 0:
        return float(ae_meta.get("latent_absmax", 4.0))
    return cfg.clip_x0


@torch.no_grad()
def sample_latents(unet: UNet, schedule: NoiseSchedule, prediction: str, cond: Conditioning, uncond: Conditioning,
                   shape: tuple[int, int, int], *, sampler: str, steps: int, guidance: float,
                   guidance_rescale: float = 0.0,
                   generator: torch.Generator, clip_x0: float | None, callback=None, dtype: torch.dtype | None = None,
                   **options) -> torch.Tensor:
    """z_0 for each row of `cond`, classifier-free guided against `uncond` (same batch size).

    dtype: autocast dtype for the network (runtime.sampling_dtype), None for float32.
    """
    B = cond[0].shape[0]
    device = cond[0].device
    z_T = torch.randn((B, *shape), generator=generator, device=device)
    model_fn = cfg_model_fn(unet_model(unet, dtype), cond, uncond, guidance, guidance_rescale)
    denoiser = make_denoiser(model_fn, schedule, prediction, clip_x0)
    return sample(sampler, denoiser, z_T, schedule, steps, generator=generator, callback=callback, **options)
