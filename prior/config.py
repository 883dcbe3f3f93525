"""The prior stage's configuration: network, diffusion process, training, sampling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from latentdiff.core.config import (
    ConfigError,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    Range,
)
from latentdiff.core.train import TrainConfig

from .samplers import SAMPLERS
from .schedule import NoiseSchedule, Prediction, ScheduleKind
from .unet import UNetConfig

# The names of prior/samplers.py's SAMPLERS registry, the one list of them (aliases such as "DPM++ 2M Karras"
# are for the command line and the Python API; a config names the sampler and its options plainly).
SamplerName = Literal[tuple(SAMPLERS)]  # type: ignore[valid-type]


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: ScheduleKind = "cosine"  # noise schedule: linear | scaled_linear | cosine
    timesteps: Annotated[int, Range(min=2)] = 1000  # T, the number of training timesteps
    zero_terminal_snr: bool = False  # rescale so abar_T = 0 (Lin et al. 2024); needs prediction v or x0
    prediction: Prediction = "eps"  # what the UNet predicts: eps | v | x0
    loss_weighting: Literal["uniform", "min_snr"] = "uniform"  # min_snr: Hang et al. 2023
    min_snr_gamma: PositiveFloat = 5.0  # gamma of min-SNR weighting (Hang et al. 2023)
    # Floor on the SNR inside min-SNR, clamp(SNR, floor, gamma) (v and x0 only): without one a zero terminal SNR
    # trains t = T-1, where sampling starts, with weight 0 (prior/losses.py; compared in docs/demo.md). 0: off.
    min_snr_floor: NonNegativeFloat = 0.0
    # Sampling clamps the predicted z_0 to [-c, c]: "latent" takes c from the autoencoder's latent space (the
    # largest |z| it measured, in prior units), "off" never clamps, a number > 0 is c itself.
    clip_x0: float | Literal["latent", "off"] = "latent"
    # Offset noise (Guttenberg 2023): eps += noise_offset * N(0, 1) drawn per (sample, channel) and broadcast over
    # H, W, so the model learns to move a latent's mean (very dark or bright images). SD fine-tunes use ~0.05-0.1.
    noise_offset: NonNegativeFloat = 0.0

    def __post_init__(self):
        # At abar_T = 0 the network input is pure noise, so x0 = (z_T - sqrt(1 - abar) eps) / sqrt(abar) is
        # undefined: an eps model cannot start sampling there (Lin et al. 2024, §3.2).
        if self.prediction == "eps" and self.zero_terminal_snr:
            raise ConfigError(
                'prediction "eps" cannot be used with zero_terminal_snr = true (x0 is undefined '
                'at abar_T = 0); use prediction "v" or "x0", or zero_terminal_snr = false'
            )
        if self.min_snr_floor > 0:
            if self.loss_weighting != "min_snr":
                raise ConfigError(
                    f'diffusion.min_snr_floor = {self.min_snr_floor} needs loss_weighting = "min_snr" '
                    f"(it is {self.loss_weighting!r}); set min_snr_floor = 0"
                )
            if self.prediction == "eps":
                raise ConfigError(
                    "diffusion.min_snr_floor applies to prediction v or x0: eps's min-SNR weight is already 1 "
                    "where SNR < gamma; set min_snr_floor = 0"
                )
            if not self.min_snr_floor < self.min_snr_gamma:
                raise ConfigError(
                    f"diffusion.min_snr_floor = {self.min_snr_floor} must be below min_snr_gamma = "
                    f"{self.min_snr_gamma} (at or above it every weight is the floor's)"
                )
        if isinstance(self.clip_x0, float) and not self.clip_x0 > 0:
            raise ConfigError(
                f"diffusion.clip_x0 = {self.clip_x0}: a bound must be > 0; "
                'use "latent" (the autoencoder\'s measured range) or "off"'
            )


@dataclass(frozen=True)
class SamplingConfig:
    sampler: SamplerName = "unipc"  # a name of prior/samplers.py's SAMPLERS (docs/prior.md, Samplers)
    steps: PositiveInt = 20  # sampler steps
    guidance: NonNegativeFloat = 3.0  # classifier-free guidance scale w (1: no guidance)
    prompts: tuple[str, ...] = ()  # fixed prompts for training-time grids (empty: the dataset's class prompts)
    per_prompt: PositiveInt = 4  # images per prompt in training-time grids
    # attention binding (prior/binding.py): z_t moved this far (in units of its RMS) down the energy of the named
    # objects' cross-attention maps at every step with t >= binding_until * T; 0: off. Scenes captions of two objects.
    binding: NonNegativeFloat = 0.0
    binding_until: Probability = 0.5


LoraTarget = Literal["attn", "ff", "conv"]


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters W + (alpha / rank) B A on the UNet's layers (Hu et al. 2021), trained through peft."""

    rank: NonNegativeInt = 0  # r, the adapters' rank (0: off, the whole UNet trains)
    alpha: PositiveFloat = 8.0  # alpha: the update is scaled by alpha / rank (kohya's and diffusers' convention)
    dropout: Probability = 0.0  # dropout on the adapters' input (peft's lora_dropout)
    # which layers get adapters: "attn" = q, k, v, out of self- and cross-attention; "ff" = the feed-forward
    # linears of the transformers; "conv" = the ResBlocks' convolutions (conv1, conv2, the 1x1 skip)
    targets: tuple[LoraTarget, ...] = ("attn",)
    lr: PositiveFloat = 1e-4  # peak learning rate of the adapters (train.lr is the base's, unused by a LoRA run)

    def __post_init__(self):
        if not self.targets:
            raise ConfigError('lora.targets is empty; name at least one of "attn", "ff", "conv"')


@dataclass(frozen=True)
class PriorConfig:
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)  # off unless lora.rank > 0 (needs --init)
    caption_dropout: Probability = 0.1  # fraction of captions replaced by "" so the model also learns p(z) (CFG)
    # weight of the token grounding loss (prior/grounding.py, after TokenCompose): each word's cross-attention
    # goes to the pixels of the object it names; needs samples whose json lists the objects (scenes). 0: off
    grounding: NonNegativeFloat = 0.0
    # the grounding loss per word (TokenCompose's per token) rather than per group of words naming the same
    # objects: a colour word's own attention must fall on its object, not only its group's (prior/grounding.py)
    grounding_per_word: bool = False
    # weight of TokenCompose's pixel loss (Grounding.pixel_loss): each object's positions read each of its words,
    # its colour word included, and not the other objects'; needs the scenes source as grounding does. 0: off
    grounding_pixel: NonNegativeFloat = 0.0
    # image side: a new run takes its autoencoder's (LatentSpace); set by hand, it must equal it
    resolution: PositiveInt = 32

    def __post_init__(self):
        if (self.grounding > 0 or self.grounding_pixel > 0) and self.model.gradient_checkpointing:
            raise ConfigError(
                "grounding > 0 and grounding_pixel > 0 read the cross-attention maps of the forward pass, which "
                "gradient checkpointing recomputes without them: set model.gradient_checkpointing = false or both to 0"
            )
        if self.sampling.steps > self.diffusion.timesteps:
            raise ConfigError(
                f"sampling.steps {self.sampling.steps} is more than diffusion.timesteps "
                f"{self.diffusion.timesteps}; use at most {self.diffusion.timesteps}"
            )


def make_schedule(cfg: DiffusionConfig) -> NoiseSchedule:
    """The noise schedule the config names."""
    return NoiseSchedule.make(cfg.schedule, cfg.timesteps, zero_terminal_snr=cfg.zero_terminal_snr)
