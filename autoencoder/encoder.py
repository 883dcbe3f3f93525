"""The Encoder and its diagonal-Gaussian posterior q(z|x) (Kingma & Welling 2014; Rombach et al. 2022 §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.core.blocks import Downsample, ResBlock, SpatialSelfAttention, group_norm


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))); the KL regulariser is KL(q || N(0, I))."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        # Clamp as LDM does: an untrained encoder can emit extreme log-variances.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(N(mu, sigma^2) || N(0, I)) summed over latent dims, one value per sample: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class Encoder(nn.Module):
    """Images (B, 3, H, W) -> posterior moments (B, 2c, H/f, W/f), f = 2^(levels-1).

    The keyword options express the KL encoder of LDM's released models and Stable Diffusion
    (Rombach et al. 2022) exactly: GroupNorm over gcd(norm_groups, width) groups, downsampling padded at the
    bottom and right only, biased q/k/v in the mid-block attention, and a 1x1 conv on the moments
    (LDM's quant_conv). Their defaults are the tiny preset's own choices.
    """

    def __init__(
        self,
        in_channels: int,
        channels: tuple[int, ...],
        num_res_blocks: int,
        latent_channels: int,
        mid_attention: bool,
        attention: str = "auto",
        *,
        norm_groups: int = 32,
        asymmetric_downsample: bool = False,
        quant_conv: bool = False,
        attention_bias: bool = False,
    ):
        super().__init__()
        ch = list(channels)
        g = norm_groups
        self.conv_in = nn.Conv2d(in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        in_ch = ch[0]
        for level, out_ch in enumerate(ch):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(in_ch, out_ch, norm_groups=g))
                in_ch = out_ch
            last = level == len(ch) - 1
            self.down.append(
                nn.ModuleDict(
                    {
                        "blocks": blocks,
                        "downsample": nn.Identity() if last else Downsample(in_ch, asymmetric=asymmetric_downsample),
                    }
                )
            )
        self.mid = nn.ModuleList([ResBlock(in_ch, norm_groups=g), ResBlock(in_ch, norm_groups=g)])
        self.mid_attn = (
            SpatialSelfAttention(in_ch, backend=attention, qkv_bias=attention_bias, norm_groups=g)
            if mid_attention
            else None
        )
        self.norm_out = group_norm(in_ch, g)
        self.conv_out = nn.Conv2d(in_ch, 2 * latent_channels, 3, padding=1)
        # A module only when used, so the tiny preset's state dict (and its encoder hash) is unchanged.
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if quant_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level["blocks"]:
                h = block(h)
            h = level["downsample"](h)
        h = self.mid[0](h)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid[1](h)
        moments = self.conv_out(F.silu(self.norm_out(h)))  # (B, 2c, h, w)
        return self.quant_conv(moments) if self.quant_conv is not None else moments
