"""The prior stage's configuration: network, diffusion process, training, sampling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from latentdiff.core.config import ConfigError
from latentdiff.core.train import TrainConfig

from .schedule import NoiseSchedule
from .unet import UNetConfig


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: str = "cosine"  # noise schedule: linear | scaled_linear | cosine
    timesteps: int = 1000  # T, the number of training timesteps
    zero_terminal_snr: bool = False  # rescale so abar_T = 0 (Lin et al. 2024); needs prediction v or x0
    prediction: str = "eps"  # what the UNet predicts: eps | v | x0
    loss_weighting: str = "uniform"  # uniform | min_snr
    min_snr_gamma: float = 5.0  # gamma of min-SNR weighting (Hang et al. 2023)
    # Sampling clamps the predicted z_0 to [-c, c]: "latent" takes c from the autoencoder's latent space (the
    # largest |z| it measured, in prior units), "off" never clamps, a number > 0 is c itself.
    clip_x0: float | Literal["latent", "off"] = "latent"

    def __post_init__(self) -> None:
        if isinstance(self.clip_x0, float) and not self.clip_x0 > 0:
            raise ConfigError(f"diffusion.clip_x0 = {self.clip_x0}: a bound must be > 0; "
                              'use "latent" (the autoencoder\'s measured range) or "off"')


@dataclass(frozen=True)
class SamplingConfig:
    sampler: str = "ddim"  # ddpm | ddim | dpmpp-2m | euler | heun
    steps: int = 50  # sampler steps
    guidance: float = 3.0  # classifier-free guidance scale w (1: no guidance)
    prompts: tuple[str, ...] = ()  # fixed prompts for training-time grids (empty: the dataset's class prompts)
    per_prompt: int = 4  # images per prompt in training-time grids


@dataclass(frozen=True)
class PriorConfig:
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    caption_dropout: float = 0.1  # fraction of captions replaced by "" so the model also learns p(z) (CFG)
    resolution: int = 32  # image side: a new run takes its autoencoder's (LatentSpace); set by hand, it must equal it


def make_schedule(cfg: DiffusionConfig) -> NoiseSchedule:
    """The noise schedule the config names."""
    return NoiseSchedule.make(cfg.schedule, cfg.timesteps, zero_terminal_snr=cfg.zero_terminal_snr)
