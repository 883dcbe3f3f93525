"""The prior stage's configuration: network, diffusion process, training, sampling."""

from __future__ import annotations

from dataclasses import dataclass, field

from latentdiff.core.train import TrainConfig

from .unet import UNetConfig


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: str = "cosine"  # noise schedule: linear | scaled_linear | cosine
    timesteps: int = 1000  # T, the number of training timesteps
    zero_terminal_snr: bool = False  # rescale so abar_T = 0 (Lin et al. 2024); needs prediction v or x0
    prediction: str = "eps"  # what the UNet predicts: eps | v | x0
    loss_weighting: str = "uniform"  # uniform | min_snr
    min_snr_gamma: float = 5.0  # gamma of min-SNR weighting (Hang et al. 2023)
    clip_x0: float = -1.0  # sampling: clamp predicted z_0 to [-c, c] (0: off; -1: the autoencoder's measured range)


@dataclass(frozen=True)
class SamplingConfig:
    sampler: str = "unipc"  # a name of prior.samplers.SAMPLERS or ALIASES; unipc: the most accurate at 20 (README)
    steps: int = 20  # sampler steps
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
    resolution: int = 32  # image side fed to the autoencoder
