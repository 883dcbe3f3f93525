"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around the network.

`cfg_model_fn(model, cond, uncond, scale)` turns `model(z_t, t, c) -> raw output` into the
`model_fn(z_t, t)` that `samplers.make_denoiser` takes. The combination
out = out_uncond + scale * (out_cond - out_uncond) (Ho & Salimans 2022, eq. 6) is applied to the
raw output (eps, x0 or v alike): for fixed z_t and t each parameterisation is an affine function
of the others with the same weights, so guiding any of them gives the same (x0, eps).

Guidance rescale (Lin et al. 2024, §3.4) pulls the guided output's per-sample std back towards
the conditional output's, against the over-exposure large scales cause.

A guidance interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval
improves sample and distribution quality in diffusion models", §3) guides only at noise levels
sigma in (sigma_lo, sigma_hi] and runs the conditional model alone elsewhere: at high noise
guidance pulls every sample towards the same few modes (it costs diversity, hence FID), and at
low noise it does little. Outside the interval a step costs one network pass instead of two.

A negative prompt is just a different `uncond`: its conditioning takes the place of the empty
caption's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Model = Callable[[Tensor, Tensor, Any], Tensor]
# A conditioning object: a tensor with a leading batch dim, None, or a tuple/list/dict of those.
Conditioning = Any


def concat_conditioning(a: Conditioning, b: Conditioning, _where: str = "conditioning") -> Conditioning:
    """Concatenate two conditioning objects of the same structure along dim 0 (the batch)."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(
                f"{_where}: cannot batch shapes {tuple(a.shape)} and {tuple(b.shape)}; "
                "they may differ only in the leading batch dim"
            )
        return torch.cat([a, b], dim=0)
    if a is None and b is None:
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            raise ValueError(f"{_where}: keys differ, {sorted(a)} vs {sorted(b)}")
        return {k: concat_conditioning(a[k], b[k], f"{_where}[{k!r}]") for k in a}
    if isinstance(a, (tuple, list)) and type(a) is type(b):
        if len(a) != len(b):
            raise ValueError(f"{_where}: lengths differ, {len(a)} vs {len(b)}")
        return type(a)(concat_conditioning(x, y, f"{_where}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    raise TypeError(
        f"{_where}: cannot batch {type(a).__name__} with {type(b).__name__}; conditioning must be "
        "tensors with a leading batch dim, None, or tuples/lists/dicts of those, the same structure in both"
    )


def rescale_guidance(guided: Tensor, cond: Tensor, rescale: float) -> Tensor:
    """Guidance rescale, Lin et al. 2024 §3.4: the guided output's per-sample std brought
    back towards the conditional output's.

    x_rescaled = x_cfg * std(x_pos) / std(x_cfg), out = phi x_rescaled + (1 - phi) x_cfg, the std taken
    per sample over every dim but the batch; rescale = phi in [0, 1] (the paper uses 0.7). Shapes (B, ...).
    """
    dims = tuple(range(1, guided.ndim))
    std_cfg = guided.std(dim=dims, keepdim=True)
    # a constant guided output (std 0) is left as it is rather than divided by zero
    ratio = torch.where(std_cfg > 0, cond.std(dim=dims, keepdim=True) / std_cfg, torch.ones_like(std_cfg))
    return guided * (rescale * ratio + (1 - rescale))


Interval = tuple[float, float]  # (sigma_lo, sigma_hi): guide where sigma_lo < sigma(t) <= sigma_hi


def check_interval(interval) -> Interval | None:
    """A guidance interval as (sigma_lo, sigma_hi) floats with 0 <= sigma_lo < sigma_hi (inf allowed), or None.

    interval: two numbers, the text "LO,HI" (the command line's), or None / "all" for every step.
    Raises ValueError naming the rule for anything else.
    """
    if isinstance(interval, str):
        interval = None if interval.strip().lower() == "all" else interval.split(",")
    if interval is None:
        return None
    try:
        lo, hi = (float(x) for x in interval)
    except (TypeError, ValueError):
        raise ValueError(
            f"guidance interval must be two numbers (sigma_lo, sigma_hi) or 'all', got {interval!r}"
        ) from None
    if not (math.isfinite(lo) and 0 <= lo < hi):
        raise ValueError(f"guidance interval needs 0 <= sigma_lo < sigma_hi, got ({lo:g}, {hi:g})")
    return lo, hi


def interval_text(interval: Interval | None) -> str:
    """The inverse of check_interval's text form: "LO,HI" (shortest %g, inf as "inf"), or "all" for None."""
    return "all" if interval is None else "{:g},{:g}".format(*interval)


def in_interval(sigma: Callable[[Tensor], Tensor], interval: Interval) -> Callable[[Tensor], Tensor]:
    """guided(t) -> (B,) bool, True where sigma(t) lies in (sigma_lo, sigma_hi] (Kynkäänniemi et al. 2024, §3).

    sigma: the schedule's VE noise level of a timestep (NoiseSchedule.sigma), t (B,) float.
    """
    lo, hi = interval

    def guided(t: Tensor) -> Tensor:
        s = sigma(t)
        return (s > lo) & (s <= hi)

    return guided


def cfg_model_fn(
    model: Model,
    cond: Conditioning,
    uncond: Conditioning,
    scale: float,
    rescale: float = 0.0,
    guided: Callable[[Tensor], Tensor] | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """model_fn(z_t, t) = uncond + scale * (cond - uncond), from one network pass over a 2B batch.

    scale == 1 is the conditional model alone (one pass over B); scale == 0 the unconditional alone.
    rescale > 0 applies `rescale_guidance` to the guided output (the model's raw output, which the paper,
    training with v-prediction, rescales); rescale = 0 is plain guidance.
    guided: t (B,) -> (B,) bool, the rows to guide at this step (`in_interval`); the others get the
    conditional output alone (scale 1), and a step that guides no row makes one pass over B. None: every step.
    """
    scale, rescale = float(scale), float(rescale)
    if not (math.isfinite(scale) and math.isfinite(rescale) and 0 <= rescale <= 1):
        raise ValueError(f"guidance scale must be finite and guidance rescale in [0, 1], got {scale!r} and {rescale!r}")
    if scale == 1.0:
        return lambda z_t, t: model(z_t, t, cond)
    if scale == 0.0 and rescale == 0.0 and guided is None:
        return lambda z_t, t: model(z_t, t, uncond)
    both = concat_conditioning(cond, uncond)  # built once, reused at every step

    def model_fn(z_t: Tensor, t: Tensor) -> Tensor:
        rows = None if guided is None else guided(t)
        if rows is not None and not bool(rows.any()):
            return model(z_t, t, cond)
        B = z_t.shape[0]
        out = model(torch.cat([z_t, z_t]), torch.cat([t, t]), both)  # (2B, ...)
        out_cond, out_uncond = out[:B], out[B:]
        guided_out = out_uncond + scale * (out_cond - out_uncond)
        if rescale > 0:
            guided_out = rescale_guidance(guided_out, out_cond, rescale)
        if rows is None or bool(rows.all()):
            return guided_out
        return torch.where(rows.view(-1, *[1] * (out_cond.ndim - 1)), guided_out, out_cond)

    return model_fn
