"""The Decoder network: latents (B, c, h, w) -> images (B, 3, f*h*upscale, f*w*upscale).

It lives in its own part so it can be trained alone after the autoencoder (the decoder
stage) without touching the encoder, and so the pipeline can swap decoders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.core.blocks import AttentionBackend, ResBlock, SpatialSelfAttention, Upsample, group_norm
from latentdiff.core.config import PositiveInt


@dataclass(frozen=True)
class DecoderConfig:
    out_channels: PositiveInt = 3  # image channels
    channels: tuple[PositiveInt, ...] = (16, 32, 64)  # widths from the image level down to the latent level
    num_res_blocks: PositiveInt = 1  # ResBlocks per level
    latent_channels: PositiveInt = 4  # c of the latent z
    mid_attention: bool = False  # self-attention at the latent resolution
    attention: AttentionBackend = "auto"  # attention backend: auto | sdpa | xformers | math
    upscale: Literal[1, 2, 4] = 1  # extra 2x upsampling levels' total factor: a super-resolving decoder
    # The fields below express LDM's / Stable Diffusion's decoder exactly; their defaults are the tiny preset's.
    norm_groups: PositiveInt = 32  # GroupNorm groups, at most: gcd(norm_groups, width) per layer
    upsample_narrows: bool = True  # the upsampling conv narrows the width (False: the next ResBlock does, as LDM)
    post_quant_conv: bool = False  # a 1x1 conv on z before conv_in (LDM's post_quant_conv)
    attention_bias: bool = False  # biases on the mid-block attention's q, k, v projections (LDM has them)

    @property
    def downsampling(self) -> int:
        """f: image side / latent side, before any upscaling."""
        return 2 ** (len(self.channels) - 1)


class Decoder(nn.Module):
    """Mirror of the Encoder: mid block at the latent level, then ResBlocks and 2x upsampling per level."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        if cfg.upscale not in (1, 2, 4):
            raise ValueError(f"decoder upscale must be 1, 2 or 4, got {cfg.upscale}")
        self.cfg = cfg
        ch = list(cfg.channels)
        g = cfg.norm_groups
        c = cfg.latent_channels
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.post_quant_conv else None
        self.conv_in = nn.Conv2d(c, ch[-1], 3, padding=1)
        self.mid = nn.ModuleList([ResBlock(ch[-1], norm_groups=g), ResBlock(ch[-1], norm_groups=g)])
        self.mid_attn = (
            SpatialSelfAttention(ch[-1], backend=cfg.attention, qkv_bias=cfg.attention_bias, norm_groups=g)
            if cfg.mid_attention
            else None
        )
        self.up = nn.ModuleList()
        in_ch = ch[-1]
        for level in reversed(range(len(ch))):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(in_ch, ch[level], norm_groups=g))
                in_ch = ch[level]
            # By default the upsampling conv narrows to the next level's width (cheaper than after it).
            out_ch = ch[level - 1] if level > 0 and cfg.upsample_narrows else in_ch
            self.up.append(
                nn.ModuleDict(
                    {
                        "blocks": blocks,
                        "upsample": Upsample(in_ch, out_ch) if level > 0 else nn.Identity(),
                    }
                )
            )
            in_ch = out_ch
        # Super-resolution levels: extra 2x steps at the image-level width.
        self.extra = nn.ModuleList()
        for _ in range({1: 0, 2: 1, 4: 2}[cfg.upscale]):
            self.extra.append(nn.ModuleList([Upsample(in_ch), ResBlock(in_ch, norm_groups=g)]))
        self.norm_out = group_norm(in_ch, g)
        self.conv_out = nn.Conv2d(in_ch, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        h = self.conv_in(z)
        h = self.mid[0](h)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid[1](h)
        for level in self.up:
            for block in level["blocks"]:
                h = block(h)
            h = level["upsample"](h)
        for upsample, block in self.extra:
            h = block(upsample(h))
        return self.conv_out(F.silu(self.norm_out(h)))

    @property
    def last_layer(self) -> torch.Tensor:
        """The output conv's weight: where the adversarial loss's adaptive weight is measured."""
        return self.conv_out.weight
