"""The denoiser f(z_t, t, c): a UNet over latents with self- and cross-attention to text.

The layout of Latent Diffusion's UNet (Rombach et al. 2022, §3.3; Ho et al. 2020, App. B):
ResBlocks carrying a timestep embedding, transformer blocks (self-attention, then
cross-attention to the text encoder's per-token states, then a feed-forward) at chosen
levels, skip connections from each down block to its up block, zero-initialised output.

With the fields of the `base` preset (per-level heads, 1x1-conv or linear projections in and out of
the transformers, GroupNorm eps 1e-5 outside them) it is exactly diffusers' UNet2DConditionModel of
Stable Diffusion 1.x and 2.x; prior/interchange.py maps the configs and weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from latentdiff.core.blocks import (
    Attention,
    AttentionBackend,
    Downsample,
    ResBlock,
    Upsample,
    group_norm,
    timestep_embedding,
    zero_module,
)
from latentdiff.core.config import ConfigError, NonNegativeInt, PositiveFloat, PositiveInt, Probability


@dataclass(frozen=True)
class UNetConfig:
    in_channels: PositiveInt = 4  # latent channels c
    channels: tuple[PositiveInt, ...] = (64, 128)  # width per level; len-1 downsamplings of the latent grid
    num_res_blocks: PositiveInt = 2  # ResBlocks per level on the way down (one more on the way up)
    attention_levels: tuple[NonNegativeInt, ...] = (0, 1)  # levels (0 = full latent resolution) with transformers
    # attention heads: one count for every level, or one per level (SD 2.x: width / 64); the middle block
    # takes the last level's
    heads: PositiveInt | tuple[PositiveInt, ...] = 4
    context_dim: PositiveInt = 128  # width D of the text encoder's per-token states
    # how the transformers project in and out of the feature map: 1x1 conv (SD 1.x) or linear per position (SD 2.x)
    projection: Literal["conv", "linear"] = "conv"
    norm_groups: PositiveInt = 32  # GroupNorm groups, at most: gcd(norm_groups, width) per layer
    norm_eps: PositiveFloat = 1e-6  # eps of the ResBlocks' and the output's GroupNorms (SD: 1e-5; transformers: 1e-6)
    pooled_dim: NonNegativeInt = 0  # width E of the pooled text embedding added to the time embedding (0: not used)
    # learned embeddings of the token index added to the text states the cross-attention reads (0: none; else
    # at least the text encoder's context length): where each word stands, for the keys and values
    context_positions: NonNegativeInt = 0
    # transformer layers over the text tokens (self-attention, feed-forward; zero-initialised residuals, so
    # they start as the identity) that the prior trains with its own loss before cross-attending (0: none)
    context_layers: NonNegativeInt = 0
    dropout: Probability = 0.0  # dropout inside ResBlocks
    attention: AttentionBackend = "auto"  # attention backend: auto (= sdpa) | sdpa | xformers | math
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower

    def __post_init__(self):
        levels = len(self.channels)
        if any(level >= levels for level in self.attention_levels):
            raise ConfigError(
                f"attention_levels {list(self.attention_levels)} name a level beyond the "
                f"{levels} of channels; use levels 0..{levels - 1}"
            )
        if isinstance(self.heads, tuple) and len(self.heads) != levels:
            raise ConfigError(
                f"heads {list(self.heads)} names {len(self.heads)} levels but channels has {levels}; "
                "give one count per level or a single count"
            )
        # The middle block attends at the last width with the last level's heads, the levels at theirs.
        bad = [
            f"{self.channels[level]} by {self.level_heads(level)}"
            for level in sorted({levels - 1, *self.attention_levels})
            if self.channels[level] % self.level_heads(level)
        ]
        if bad:
            shown = list(self.heads) if isinstance(self.heads, tuple) else self.heads
            raise ConfigError(f"heads {shown} does not divide the attention widths: {', '.join(bad)}")
        if self.context_layers and self.context_dim % self.level_heads(levels - 1):
            raise ConfigError(
                f"context_layers attend over the text with the middle block's {self.level_heads(levels - 1)} "
                f"heads, which do not divide context_dim {self.context_dim}"
            )

    def level_heads(self, level: int) -> int:
        """The attention heads at `level` (0 = full latent resolution); the middle block uses the last level's."""
        return self.heads[level] if isinstance(self.heads, tuple) else self.heads


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020), as in Stable Diffusion's transformer blocks."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim * mult * 2)
        self.proj_out = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Self-attention over positions, cross-attention to the text, feed-forward; pre-norm residuals."""

    def __init__(self, dim: int, heads: int, context_dim: int, backend: str):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, backend=backend)
        self.cross_attn = Attention(dim, heads, context_dim=context_dim, backend=backend)
        self.ff = FeedForward(dim)
        # UNet.cross_attention_maps sets a list here: each forward then appends its cross-attention
        # probabilities, averaged over the heads (B, positions, text tokens)
        self.maps: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x))
        if self.maps is None:
            x = x + self.cross_attn(self.norm2(x), context, mask)
        else:
            out, probs = self.cross_attn.with_probabilities(self.norm2(x), context, mask)
            self.maps.append(probs.mean(dim=1))
            x = x + out
        return x + self.ff(self.norm3(x))


class TextLayer(nn.Module):
    """Self-attention over the text tokens, then a feed-forward; pre-norm residuals that start at zero.

    The prior's own layers on the frozen encoder's states (model.context_layers): each word's state can
    take in the others' (which shape a colour or a relation belongs to) under the prior's loss.
    """

    def __init__(self, dim: int, heads: int, backend: str):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, backend=backend)
        self.ff = FeedForward(dim)
        zero_module(self.attn.to_out)
        zero_module(self.ff.proj_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, D) text states; mask (B, T) bool, True at the tokens that may be attended."""
        h = self.norm1(x)
        x = x + self.attn(h, h, mask)
        return x + self.ff(self.norm2(x))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> TransformerBlock -> feature map, as a residual that starts at zero.

    linear: project in and out per token with nn.Linear (SD 2.x) instead of a 1x1 conv on the map (SD 1.x);
    the same function, with the weights stored as (C, C) rather than (C, C, 1, 1).
    """

    def __init__(
        self, ch: int, heads: int, context_dim: int, backend: str, linear: bool = False, norm_groups: int = 32
    ):
        super().__init__()
        self.linear = linear
        self.norm = group_norm(ch, norm_groups)  # eps 1e-6 in every preset, as in SD's transformers
        self.proj_in = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)
        self.block = TransformerBlock(ch, heads, context_dim, backend)
        self.proj_out = zero_module(nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, C, H, W = x.shape
        if self.linear:
            h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, C)
            h = self.proj_out(self.block(h, context, mask))
            return x + h.transpose(1, 2).reshape(B, C, H, W)
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, C)
        h = self.block(h, context, mask)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class UNetLayer(nn.Module):
    """One ResBlock, optionally followed by a SpatialTransformer."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, cfg: UNetConfig, level: int, attend: bool):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, cfg.dropout, cfg.norm_groups, cfg.norm_eps)
        self.attn = None
        if attend:
            heads = cfg.level_heads(level)
            linear = cfg.projection == "linear"
            self.attn = SpatialTransformer(out_ch, heads, cfg.context_dim, cfg.attention, linear, cfg.norm_groups)

    def forward(self, h, emb, context, mask):
        h = self.res(h, emb)
        return self.attn(h, context, mask) if self.attn is not None else h


class UNet(nn.Module):
    """f(z_t, t, c) -> prediction of the schedule's target (eps, v or x0), same shape as z_t."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = list(cfg.channels)
        emb_dim = 4 * ch[0]
        self.time_embed = nn.Sequential(nn.Linear(ch[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.pooled_embed = nn.Linear(cfg.pooled_dim, emb_dim) if cfg.pooled_dim else None
        # Zero at the start: the model first reads the states as they are (Vaswani et al. 2017, §3.5: learned
        # positional embeddings, here on the keys' and values' side of the cross-attention only).
        self.context_position = (
            nn.Parameter(torch.zeros(cfg.context_positions, cfg.context_dim)) if cfg.context_positions else None
        )
        heads = cfg.level_heads(len(cfg.channels) - 1)
        self.context_layers = nn.ModuleList(
            TextLayer(cfg.context_dim, heads, cfg.attention) for _ in range(cfg.context_layers)
        )
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)

        self.down = nn.ModuleList()
        skips = [ch[0]]
        in_ch = ch[0]
        for level, out_ch in enumerate(ch):
            for _ in range(cfg.num_res_blocks):
                self.down.append(UNetLayer(in_ch, out_ch, emb_dim, cfg, level, level in cfg.attention_levels))
                in_ch = out_ch
                skips.append(in_ch)
            if level < len(ch) - 1:
                self.down.append(Downsample(in_ch))
                skips.append(in_ch)

        last = len(ch) - 1
        self.mid = nn.ModuleList(
            [UNetLayer(in_ch, in_ch, emb_dim, cfg, last, True), UNetLayer(in_ch, in_ch, emb_dim, cfg, last, False)]
        )

        self.up = nn.ModuleList()
        for level in reversed(range(len(ch))):
            for _ in range(cfg.num_res_blocks + 1):
                attend = level in cfg.attention_levels
                self.up.append(UNetLayer(in_ch + skips.pop(), ch[level], emb_dim, cfg, level, attend))
                in_ch = ch[level]
            if level > 0:
                self.up.append(Upsample(in_ch))

        self.norm_out = group_norm(in_ch, cfg.norm_groups, cfg.norm_eps)
        # Zero-init the output conv: the untrained model predicts 0, a stable starting point.
        self.conv_out = zero_module(nn.Conv2d(in_ch, cfg.in_channels, 3, padding=1))

    @contextmanager
    def cross_attention_maps(self) -> Iterator[list[torch.Tensor]]:
        """Within it, every forward pass appends each cross-attention's probabilities to the list it yields:
        (B, h * w, T) per transformer, averaged over heads, rows over the text tokens summing to 1, positions
        in row-major order of that level's (h, w) grid. They come from the math path (Attention.with_probabilities),
        not the fused kernels, so keep it to the passes that need them (a training loss on them).
        """
        blocks = [m for m in self.modules() if isinstance(m, TransformerBlock)]
        maps: list[torch.Tensor] = []
        for block in blocks:
            block.maps = maps
        try:
            yield maps
        finally:
            for block in blocks:
                block.maps = None

    def _run(self, layer: nn.Module, *args):
        if self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def forward(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z_t (B, c, h, w); t (B,) timesteps (may be fractional); context (B, T, D); mask (B, T) bool.

        Raises ValueError for a latent side the levels cannot halve, a missing pooled embedding (pooled_dim > 0),
        or a context longer than context_positions (when > 0).
        """
        levels = len(self.cfg.channels) - 1
        if z_t.shape[-1] % 2**levels or z_t.shape[-2] % 2**levels:
            raise ValueError(
                f"latent side {tuple(z_t.shape[-2:])} must be divisible by {2**levels} "
                f"for a UNet with {levels + 1} levels"
            )
        emb = self.time_embed(timestep_embedding(t, self.cfg.channels[0]).to(z_t.dtype))
        if self.pooled_embed is not None:
            if pooled is None:
                raise ValueError("this UNet was built with pooled_dim > 0 and needs the pooled text embedding")
            emb = emb + self.pooled_embed(pooled.to(emb.dtype))
        context = context.to(z_t.dtype)
        if self.context_position is not None:
            if context.shape[1] > len(self.context_position):
                raise ValueError(
                    f"the text has {context.shape[1]} tokens but this UNet embeds the positions of "
                    f"{len(self.context_position)} (model.context_positions)"
                )
            context = context + self.context_position[: context.shape[1]].to(context.dtype)
        for layer in self.context_layers:
            context = layer(context, context_mask)

        h = self.conv_in(z_t)
        hs = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, Downsample) else self._run(layer, h, emb, context, context_mask)
            hs.append(h)
        for layer in self.mid:
            h = self._run(layer, h, emb, context, context_mask)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                h = self._run(layer, torch.cat([h, hs.pop()], dim=1), emb, context, context_mask)
        return self.conv_out(F.silu(self.norm_out(h)))
