"""The denoising loss, one value per sample; the training loop takes the mean.

Weighting "min_snr" is Min-SNR-gamma (Hang et al. 2023, eq. 7 and its eps/v forms in §3.4): the
x0-space weight min(SNR, gamma) divided by how the target's error scales with the x0 error,
  eps target: min(SNR, gamma) / SNR      (||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2)
  v target:   min(SNR, gamma) / (SNR + 1) (||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2)
  x0 target:  min(SNR, gamma).
With a zero terminal SNR (SNR = 0 at t = T-1) the eps weight is taken as its limit 1.

The v and x0 weights are at most SNR, so with a zero terminal SNR the step sampling starts from,
t = T-1, has weight exactly 0, and on the cosine schedule every t >= 900 less than 0.03: the network
barely learns the levels the first sampling steps visit. `floor` raises the SNR inside the min,
  x0-space weight clamp(SNR, floor, gamma)   (plain min-SNR at floor = 0),
so those steps weigh floor / (SNR + 1) in the v loss, and nothing changes where SNR >= floor. The
form max(min(SNR, 5), 1) was proposed for this on the Min-SNR authors' tracker
(TiankaiHang/Min-SNR-Diffusion-Training, issue 2); the tiny preset's value and its comparison are in
docs/demo.md. eps needs none: its weight is already 1 wherever SNR < gamma.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentdiff.prior.schedule import NoiseSchedule, check_prediction

WEIGHTINGS = ("uniform", "min_snr")


def min_snr_weight(t: Tensor, schedule: NoiseSchedule, gamma: float, prediction: str, floor: float = 0.0) -> Tensor:
    """Min-SNR-gamma weight per sample, (B,) float64 on t's device; `floor` as in the module docstring.

    Raises ValueError for a floor outside [0, gamma) or a floor with prediction eps.
    """
    check_prediction(prediction)
    if not 0 <= floor < gamma:
        raise ValueError(f"the min-SNR floor must be in [0, gamma) = [0, {gamma:g}), got {floor!r}")
    if floor and prediction == "eps":
        raise ValueError("the min-SNR floor applies to the v and x0 predictions; eps's weight is already 1 below gamma")
    snr = schedule.snr(t)
    if prediction == "eps":
        return (gamma / snr).clamp(max=1.0)  # = min(SNR, gamma) / SNR, and 1 at SNR = 0
    weight = snr.clamp(min=floor, max=gamma)  # in x0 space
    return weight / (snr + 1) if prediction == "v" else weight


def diffusion_loss(
    output: Tensor,
    target: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    weighting: str = "uniform",
    gamma: float = 5.0,
    prediction: str = "eps",
    floor: float = 0.0,
) -> Tensor:
    """Weighted mean squared error per sample, (B,) in at least float32 (DDPM eq. 14 for eps, uniform).

    gamma and floor are min-SNR's (`min_snr_weight`); uniform weighting ignores them.
    """
    if output.shape != target.shape:
        raise ValueError(f"network output {tuple(output.shape)} and target {tuple(target.shape)} differ in shape")
    dtype = torch.promote_types(output.dtype, torch.float32)  # bf16 outputs: square and average in float32
    mse = (output.to(dtype) - target.to(dtype)).square().mean(dim=tuple(range(1, output.ndim)))
    if weighting == "uniform":
        return mse
    if weighting == "min_snr":
        return mse * min_snr_weight(t.to(output.device), schedule, gamma, prediction, floor).to(dtype)
    raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")
