"""Samplers of Karras et al. 2022 in the VE variable x = z / sqrt(abar) = x_0 + sigma eps.

In x the probability-flow ODE is dx/dsigma = (x - D(x; sigma)) / sigma = eps_hat (eq. 3 with
sigma(t) = t), and the VP denoiser is evaluated at z = x / sqrt(1 + sigma^2). Every level needs a
finite sigma, so a spacing that starts at abar = 0 (trailing on a zero-terminal-SNR schedule) is
refused: "karras" and "logsnr" start at the largest finite sigma. Euler without churn is DDIM
(eta = 0) on the same levels, and Euler ancestral is DDIM with eta (tests/prior/test_samplers.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .denoiser import Denoiser, Walk, noise, t_like
from .schedule import NoiseSchedule


def _sigmas(name: str, walk: Walk) -> list[float]:
    """The walk's sigma_i, refusing a first level at abar = 0, where a step in sigma cannot start."""
    if walk.levels.abars[0] == 0.0:
        raise ValueError(
            f"{name} steps in sigma and cannot start at abar = 0 (sigma = inf, spacing {walk.levels.spacing!r} on a "
            "zero-terminal-SNR schedule); use spacing 'karras' or 'logsnr', or the ddim sampler"
        )
    return walk.levels.sigmas


def _denoise_ve(denoiser: Denoiser, x: Tensor, sigma: float, t: float) -> tuple[Tensor, Tensor, Tensor]:
    """(z_t, D(x; sigma), d) at the VE state x, with d = (x - D(x)) / sigma, which is exactly eps_hat."""
    z = x / math.sqrt(1 + sigma**2)
    x0, eps = denoiser(z, t_like(z, t))
    return z, x0, eps


def _churn(schedule: NoiseSchedule, sigmas: list[float], s_churn: float) -> tuple[list[float], list[float]]:
    """Karras et al. 2022 Alg. 2: sigma_hat_i = sigma_i (1 + gamma_i), gamma_i = min(S_churn / N, sqrt(2) - 1).

    gamma_i is also capped so that sigma_hat_i <= the schedule's sigma(T-1): no t has a larger sigma, so
    above it the network would be told less noise than its input holds (Alg. 2 itself sets gamma_i = 0
    outside [S_tmin, S_tmax]; this is that range's top). Returns the sigma_hat_i and the float t of each.
    """
    if not s_churn >= 0:
        raise ValueError(f"s_churn must be >= 0, got {s_churn!r}")
    n = len(sigmas) - 1
    gamma = min(s_churn / n, math.sqrt(2) - 1)
    hats = [max(s, min(s * (1 + gamma), schedule.sigma_max)) for s in sigmas[:-1]]
    return hats, schedule.t_from_sigma(torch.tensor(hats, dtype=torch.float64)).tolist()


def _karras_ode(name: str, denoiser: Denoiser, z_T: Tensor, walk: Walk, s_churn: float, heun: bool) -> Tensor:
    """Karras et al. 2022 Alg. 2 (Alg. 1 at s_churn = 0); Euler when heun is False. name: the sampler's, for errors."""
    sigmas, ts = _sigmas(name, walk), walk.levels.ts
    hats, t_hats = _churn(walk.schedule, sigmas, s_churn) if s_churn > 0 else (sigmas[:-1], ts)
    x = z_T * math.sqrt(1 + sigmas[0] ** 2)  # x = z / sqrt(abar)
    for i in range(walk.steps):
        s, s_hat, s_next = sigmas[i], hats[i], sigmas[i + 1]
        if s_hat > s:  # 1. raise the noise to sigma_hat: x_hat = x + sqrt(sigma_hat^2 - sigma^2) eps
            x = x + math.sqrt(s_hat**2 - s**2) * noise(x, walk.generator)
        z, x0, d = _denoise_ve(denoiser, x, s_hat, t_hats[i])  # d_i = (x_hat - D(x_hat; sigma_hat)) / sigma_hat
        walk.report(i, z, x0)
        x_next = x + (s_next - s_hat) * d  # 2. Euler step
        if heun and s_next > 0:  # 3. Heun's correction with the slope at x_{i+1}
            _, _, d_next = _denoise_ve(denoiser, x_next, s_next, ts[i + 1])
            x_next = x + (s_next - s_hat) * (d + d_next) / 2
        x = x_next
    return x  # sigma_N = 0: x is the data, where z = x


def sample_euler(denoiser: Denoiser, z_T: Tensor, walk: Walk, *, s_churn: float = 0.0) -> Tensor:
    """Euler steps on the probability-flow ODE, Karras et al. 2022 Alg. 2 without the Heun correction.

    s_churn > 0 adds Alg. 2's noise (stochastic, from the walk's generator); 0 is deterministic.
    """
    return _karras_ode("euler", denoiser, z_T, walk, s_churn, heun=False)


def sample_heun(denoiser: Denoiser, z_T: Tensor, walk: Walk, *, s_churn: float = 0.0) -> Tensor:
    """Heun's 2nd-order method, Karras et al. 2022 Alg. 1 (Alg. 2 with s_churn > 0); Euler on the last step.

    2 steps - 1 network evaluations.
    """
    return _karras_ode("heun", denoiser, z_T, walk, s_churn, heun=True)


def sample_euler_ancestral(denoiser: Denoiser, z_T: Tensor, walk: Walk, *, eta: float = 1.0) -> Tensor:
    """Euler ancestral ("Euler a"): DDPM's ancestral step (Ho et al. 2020 Alg. 2) split in the VE variable.

    From sigma to sigma', the posterior q(x' | x, x0_hat) has variance
    sigma_up^2 = sigma'^2 (sigma^2 - sigma'^2) / sigma^2 (scaled by eta^2, capped at sigma'^2): an
    Euler step down to sigma_down = sqrt(sigma'^2 - sigma_up^2), then fresh noise of std sigma_up.
    eta = 1 equals DDIM with eta = 1 on the same levels; eta = 0 is Euler.
    """
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    sigmas = _sigmas("euler-a", walk)
    x = z_T * math.sqrt(1 + sigmas[0] ** 2)
    for i, t in enumerate(walk.levels.ts):
        s, s_next = sigmas[i], sigmas[i + 1]
        z, x0, d = _denoise_ve(denoiser, x, s, t)
        walk.report(i, z, x0)
        s_up = min(s_next, eta * s_next * math.sqrt(s**2 - s_next**2) / s)
        s_down = math.sqrt(s_next**2 - s_up**2)
        x = x + (s_down - s) * d
        if s_up > 0:
            x = x + s_up * noise(x, walk.generator)
    return x
