"""Building blocks shared by the autoencoder, the decoder and the prior's UNet."""

from __future__ import annotations

import math
from functools import cache
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

# "auto" is sdpa: torch's scaled_dot_product_attention picks its fused flash or memory-efficient kernel
# per call where the inputs allow (else its math path), as fast as xformers' on current GPUs and with no
# extra install; xformers runs only when a config names it. "math" is the reference the tests compare with.
AttentionBackend = Literal["auto", "sdpa", "xformers", "math"]
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)


def group_norm(channels: int, max_groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with gcd(max_groups, channels) groups: 32 at full width, fewer in tiny presets.

    eps: 1e-6 as LDM's Normalize; Stable Diffusion's UNet uses 1e-5 in its ResBlocks and output norm.
    """
    groups = math.gcd(max_groups, channels)
    return nn.GroupNorm(groups, channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, (B,) -> (B, dim) (Vaswani et al. 2017 §3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a skip; adds a projected embedding (time) when given one.

    norm_groups, norm_eps: the GroupNorms' largest group count and eps (see group_norm).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int | None = None,
        emb_dim: int = 0,
        dropout: float = 0.0,
        norm_groups: int = 32,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        out_ch = out_ch or in_ch
        self.norm1 = group_norm(in_ch, norm_groups, norm_eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch) if emb_dim else None
        self.norm2 = group_norm(out_ch, norm_groups, norm_eps)
        self.dropout = nn.Dropout(dropout)
        # Zero-init the last conv so every block starts as the identity: deep stacks train stably.
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb is not None and emb is not None:
            h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve the resolution with a strided 3x3 conv.

    asymmetric: pad one row and column at the bottom and right only, as LDM and Stable
    Diffusion's VAE do (output i sees inputs 2i..2i+2), instead of one all round (2i-1..2i+1).
    """

    def __init__(self, ch: int, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))  # (left, right, top, bottom)
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour, then a 3x3 conv (no checkerboard artefacts).

    out_ch lets the conv also narrow to the next level's width: at twice the resolution a
    conv costs 4x, so narrowing here rather than in the next block halves that cost.
    """

    def __init__(self, ch: int, out_ch: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(ch, out_ch or ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@cache
def xformers_available(device_type: str) -> bool:
    """True when xformers imports and its memory-efficient attention runs on this device type."""
    try:
        import xformers.ops as xops
    except Exception:
        return False
    try:
        q = torch.zeros(
            1, 8, 1, 16, device=device_type, dtype=torch.float16 if device_type == "cuda" else torch.float32
        )
        xops.memory_efficient_attention(q, q, q)
        return True
    except Exception:
        return False


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) (Vaswani et al. 2017, eq. 1): (B, heads, Tq, Tk), each row summing to 1 over the
    keys; q (B, heads, Tq, d), k (B, heads, Tk, d), mask as `attention`'s."""
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, heads, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-1)


def _math_attention(q, k, v, mask):
    return torch.matmul(attention_probabilities(q, k, mask), v)


XFORMERS_KEY_MULTIPLE = 8  # xformers refuses an attention bias whose key length is not a multiple of this


def pad_keys(
    k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, multiple: int = XFORMERS_KEY_MULTIPLE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values (B, heads, Tk, d) zero-padded to Tk' = the next multiple of `multiple`, the mask
    (broadcastable to (B, heads, Tq, Tk)) extended with False: the padded keys are never attended to, so
    attention's output is unchanged. Returns (k, v, mask) as given when Tk is already a multiple.
    """
    extra = -k.shape[2] % multiple
    if extra == 0:
        return k, v, mask
    k, v = (F.pad(x, (0, 0, 0, extra)) for x in (k, v))  # (B, heads, Tk', d)
    return k, v, F.pad(mask, (0, extra), value=False)


def _xformers_attention(q, k, v, mask):
    import xformers.ops as xops

    # xformers wants (B, T, heads, d) and an additive bias instead of a boolean mask, whose key length
    # (the text's, cut after the longest prompt: 5-12 tokens) must be a multiple of 8.
    bias = None
    if mask is not None:
        k, v, mask = pad_keys(k, v, mask)
        B, H, Tq, Tk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        bias = torch.zeros(B, H, Tq, Tk, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~mask.expand(B, H, Tq, Tk), float("-inf"))
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, eq. 1) on (B, heads, T, d) tensors.

    mask: bool, broadcastable to (B, heads, Tq, Tk), True where a key may be attended to.
    backend: "sdpa" (torch's fused kernels), "xformers", "math" (the reference), or "auto" (= "sdpa").
    Raises RuntimeError for "xformers" where it is not installed or cannot run on q's device.
    """
    if backend in ("auto", "sdpa"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "math":
        return _math_attention(q, k, v, mask)
    if backend == "xformers":
        if not xformers_available(q.device.type):
            raise RuntimeError(
                f"attention = 'xformers' but xformers is not installed or does not run on "
                f"{q.device.type} (it needs CUDA and a matching torch build); use attention = 'auto' or 'sdpa'"
            )
        return _xformers_attention(q, k, v, mask)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")


class Attention(nn.Module):
    """Multi-head attention of a token sequence to itself or, given `context`, to another one."""

    def __init__(
        self, dim: int, heads: int, context_dim: int | None = None, backend: str = "auto", qkv_bias: bool = False
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
        self.heads = heads
        self.backend = backend
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)

    def _project(self, x: torch.Tensor, context: torch.Tensor | None, context_mask: torch.Tensor | None):
        """q, k, v (B, heads, T, d) and the key mask (B, 1, 1, Tk) or None."""
        B, T, C = x.shape
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        # (B, T, C) -> (B, heads, T, d)
        q, k, v = (y.reshape(B, y.shape[1], self.heads, C // self.heads).transpose(1, 2) for y in (q, k, v))
        mask = context_mask[:, None, None, :] if context_mask is not None else None  # (B, 1, 1, Tk)
        return q, k, v, mask

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        B, heads, T, d = out.shape
        return self.to_out(out.transpose(1, 2).reshape(B, T, heads * d))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, T, C); context (B, Tk, context_dim) or None (self-attention); context_mask (B, Tk) bool."""
        q, k, v, mask = self._project(x, context, context_mask)
        return self._merge(attention(q, k, v, mask, self.backend))  # (B, T, C)

    def with_probabilities(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward's output, computed on the math path, and its attention probabilities (B, heads, T, Tk).

        For losses on where the attention goes (prior/grounding.py); the fused kernels never form them.
        """
        q, k, v, mask = self._project(x, context, context_mask)
        probs = attention_probabilities(q, k, mask)
        return self._merge(torch.matmul(probs, v)), probs


class SpatialSelfAttention(nn.Module):
    """Self-attention over the H*W positions of a feature map, with a residual (VAE mid-block)."""

    def __init__(self, ch: int, heads: int = 1, backend: str = "auto", qkv_bias: bool = False, norm_groups: int = 32):
        super().__init__()
        self.norm = group_norm(ch, norm_groups)
        self.attn = Attention(ch, heads, backend=backend, qkv_bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # Normalise the flattened (B, C, HW) view, as diffusers does: on a channels-last x the 4-D GroupNorm
        # kernel sums in another order, and imported Stable Diffusion VAEs would then differ by ~1e-5.
        h = self.norm(x.reshape(B, C, H * W)).transpose(1, 2)  # (B, HW, C)
        h = self.attn(h)
        return x + h.transpose(1, 2).reshape(B, C, H, W)
