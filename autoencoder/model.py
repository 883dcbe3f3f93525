"""The KL autoencoder: Encoder -> q(z|x) -> z -> Decoder, and the configs that build it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from latentdiff.core.blocks import AttentionBackend
from latentdiff.core.config import ConfigError, NonNegativeFloat, PositiveInt
from latentdiff.core.train import TrainConfig
from latentdiff.decoder.losses import DecoderLossConfig
from latentdiff.decoder.network import Decoder, DecoderConfig

from .encoder import DiagonalGaussian, Encoder


@dataclass(frozen=True)
class AutoencoderModelConfig:
    in_channels: PositiveInt = 3  # image channels
    channels: tuple[PositiveInt, ...] = (16, 32, 64)  # width per level; f = 2^(levels-1) (3 levels: f=4)
    num_res_blocks: PositiveInt = 1  # ResBlocks per level, in the encoder and the decoder
    latent_channels: PositiveInt = 4  # c: channels of the latent z
    mid_attention: bool = False  # self-attention at the latent resolution (worth it at 256px)
    attention: AttentionBackend = "auto"  # attention backend: auto | sdpa | xformers | math
    # The fields below express LDM's and Stable Diffusion's KL autoencoder exactly (`import autoencoder`
    # and the base preset set them); their defaults are the tiny preset's own measured choices.
    norm_groups: PositiveInt = 32  # GroupNorm groups, at most: gcd(norm_groups, width) per layer
    downsample_padding: Literal["symmetric", "asymmetric"] = "symmetric"  # asymmetric: bottom/right only (LDM)
    decoder_res_blocks: PositiveInt | None = None  # ResBlocks per decoder level (None: num_res_blocks; LDM: one more)
    upsample_narrows: bool = True  # the decoder's upsampling conv narrows the width (False: the next ResBlock, LDM)
    quant_conv: bool = False  # 1x1 conv on the posterior moments (LDM's quant_conv); part of the encoder
    post_quant_conv: bool = False  # 1x1 conv on z before decoding (LDM's post_quant_conv); part of the decoder
    attention_bias: bool = False  # biases on the mid-block attention's q, k, v projections (LDM has them)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def decoder_config(self) -> DecoderConfig:
        return DecoderConfig(
            out_channels=self.in_channels,
            channels=self.channels,
            num_res_blocks=self.num_res_blocks if self.decoder_res_blocks is None else self.decoder_res_blocks,
            latent_channels=self.latent_channels,
            mid_attention=self.mid_attention,
            attention=self.attention,
            norm_groups=self.norm_groups,
            upsample_narrows=self.upsample_narrows,
            post_quant_conv=self.post_quant_conv,
            attention_bias=self.attention_bias,
        )


@dataclass(frozen=True)
class AutoencoderLossConfig(DecoderLossConfig):
    """The decoder-output losses' fields (decoder/losses.py), plus the KL weight."""

    kl_weight: NonNegativeFloat = 1e-6  # weight of KL, summed over latent dims / number of image values (as LDM)


@dataclass(frozen=True)
class AutoencoderConfig:
    model: AutoencoderModelConfig = field(default_factory=AutoencoderModelConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resolution: PositiveInt = 32  # training image side (images are resized to it when they differ)
    scale_batches: PositiveInt = 16  # batches of training data used to measure the latent std after training
    eval_images: PositiveInt = 2000  # validation images for the final PSNR/LPIPS

    def __post_init__(self):
        f = self.model.downsampling
        if self.resolution % f:
            raise ConfigError(
                f"resolution {self.resolution} is not a multiple of the downsampling factor {f} "
                f"of model.channels ({len(self.model.channels)} levels); use a multiple of {f}"
            )


class Autoencoder(nn.Module):
    """x -> q(z|x) -> z -> x_hat. The prior trains on z * scale_factor, measured after training."""

    def __init__(self, cfg: AutoencoderModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(
            cfg.in_channels,
            cfg.channels,
            cfg.num_res_blocks,
            cfg.latent_channels,
            cfg.mid_attention,
            cfg.attention,
            norm_groups=cfg.norm_groups,
            asymmetric_downsample=cfg.downsample_padding == "asymmetric",
            quant_conv=cfg.quant_conv,
            attention_bias=cfg.attention_bias,
        )
        self.decoder = Decoder(cfg.decoder_config())

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior
