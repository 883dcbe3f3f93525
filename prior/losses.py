"""The denoising loss, one value per sample; the training loop takes the mean.

Weighting "min_snr" is Min-SNR-gamma (Hang et al. 2023, eq. 7 and its eps/v forms in §3.4): the
x0-space weight min(SNR, gamma) divided by how the target's error scales with the x0 error,
  eps target: min(SNR, gamma) / SNR      (||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2)
  v target:   min(SNR, gamma) / (SNR + 1) (||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2)
  x0 target:  min(SNR, gamma).
With a zero terminal SNR (SNR = 0 at t = T-1) the eps weight is taken as its limit 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentdiff.prior.schedule import NoiseSchedule, check_prediction

WEIGHTINGS = ("uniform", "min_snr")


def min_snr_weight(t: Tensor, schedule: NoiseSchedule, gamma: float, prediction: str) -> Tensor:
    """Min-SNR-gamma weight per sample, (B,) float64 on t's device."""
    check_prediction(prediction)
    snr = schedule.snr(t)
    if prediction == "eps":
        return (gamma / snr).clamp(max=1.0)  # = min(SNR, gamma) / SNR, and 1 at SNR = 0
    if prediction == "v":
        return snr.clamp(max=gamma) / (snr + 1)
    return snr.clamp(max=gamma)


def diffusion_loss(
    output: Tensor,
    target: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    weighting: str = "uniform",
    gamma: float = 5.0,
    prediction: str = "eps",
) -> Tensor:
    """Weighted mean squared error per sample, (B,) in at least float32 (DDPM eq. 14 for eps, uniform)."""
    if output.shape != target.shape:
        raise ValueError(f"network output {tuple(output.shape)} and target {tuple(target.shape)} differ in shape")
    dtype = torch.promote_types(output.dtype, torch.float32)  # bf16 outputs: square and average in float32
    mse = (output.to(dtype) - target.to(dtype)).square().mean(dim=tuple(range(1, output.ndim)))
    if weighting == "uniform":
        return mse
    if weighting == "min_snr":
        return mse * min_snr_weight(t.to(output.device), schedule, gamma, prediction).to(dtype)
    raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")
