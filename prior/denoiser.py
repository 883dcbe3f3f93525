"""The denoiser every sampler drives, and the small parts the samplers share.

`denoiser(z_t, t) -> (x0_hat, eps_hat)` takes t as a float tensor (B,) on z_t's device in the
schedule's time units 0..T-1, and returns a consistent pair, z_t = sqrt(abar_t) x0_hat +
sqrt(1 - abar_t) eps_hat; `make_denoiser` builds one from a raw network `model_fn(z_t, t)`.
`callback(i, total, z_t, x0_hat)` runs after the i-th step's first network evaluation (0-based)
with the state that evaluation saw.

`generator` is one torch.Generator for the whole batch, or one per row of z_T (`Generators`):
then row k's noise comes from generator k alone, so an image's noise does not depend on the other
rows of its batch (pipeline: one generator per image, seeded seed + k).

A sampler is `sample_xxx(denoiser, z_T, walk, **options) -> z_0`: `Walk` holds what every sampler
is handed besides its own options (the levels, the generator, the callback), so a sampler's body is
its update rule alone; samplers.sample builds the walk from the spacing options and the steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .schedule import NoiseSchedule, check_prediction
from .spacing import NoiseLevels

Denoiser = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
ModelFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, int, Tensor, Tensor], None]
Generators = torch.Generator | Sequence[torch.Generator] | None


def make_denoiser(
    model_fn: ModelFn, schedule: NoiseSchedule, prediction: str, clip_x0: float | None = None
) -> Denoiser:
    """Wrap a raw network output (eps, x0 or v) into the (x0_hat, eps_hat) a sampler needs.

    With clip_x0 the x0 estimate is clamped to [-clip_x0, clip_x0] and eps recomputed from it, so
    the pair stays consistent. Without that, an eps error at the first step is multiplied by
    sqrt(1 - abar)/sqrt(abar) (~2e4 for cosine's abar_T ~ 2e-9) in x0_hat.
    """
    check_prediction(prediction)
    if prediction == "eps" and schedule.zero_terminal_snr:
        raise ValueError(
            "an eps-prediction model cannot recover z_0 at t = T-1 on a zero-terminal-SNR "
            "schedule (abar_T = 0, Lin et al. 2024 §3.2); train with prediction 'v' or 'x0', "
            "or sample with a schedule made with zero_terminal_snr=False"
        )
    if clip_x0 is not None and not clip_x0 > 0:
        raise ValueError(f"clip_x0 must be a positive bound or None, got {clip_x0!r}")

    def denoiser(z_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        x0, eps = schedule.to_x0_eps(model_fn(z_t, t), z_t, t, prediction)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = schedule.eps_from_x0(z_t, x0, t)
        return x0, eps

    return denoiser


def t_like(z: Tensor, t: float) -> Tensor:
    """t as a float tensor (B,) on z's device; float32 unless z is float64 (t up to 999 in fp16 is too coarse)."""
    dtype = torch.promote_types(z.dtype, torch.float32)
    return torch.full((z.shape[0],), t, device=z.device, dtype=dtype)


def noise(z: Tensor, generator: Generators) -> Tensor:
    """Standard normal noise shaped like z (B, ...), drawn from `generator` (all sampler noise comes from it).

    A sequence of B generators draws row k from generator k (ValueError when the count is not B).
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    if len(generator) != z.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {z.shape[0]} rows: give one per row")
    return torch.stack([torch.randn(z.shape[1:], generator=g, device=z.device, dtype=z.dtype) for g in generator])


@dataclass(frozen=True)
class Walk:
    """What every sampler is handed besides the denoiser, z_T (B, ...) and its own options."""

    schedule: NoiseSchedule  # the levels' schedule (Karras churn places its raised levels on it)
    levels: NoiseLevels  # the `steps` levels visited, then the data (spacing.Spacing.levels)
    generator: Generators = None  # every noise draw comes from it (`noise`)
    callback: Callback | None = None  # callback(i, steps, z_t, x0_hat) after step i's first evaluation

    @property
    def steps(self) -> int:
        return len(self.levels.ts)

    def report(self, i: int, z_t: Tensor, x0: Tensor) -> None:
        """Run the callback, if any, for step i with the state z_t its first evaluation saw and x0_hat."""
        if self.callback is not None:
            self.callback(i, self.steps, z_t, x0)
