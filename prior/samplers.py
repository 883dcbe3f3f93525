"""Samplers: plain functions with one signature, independent of any network.

    sample_xxx(denoiser, z_T, schedule, steps, *, generator=None, callback=None, **options) -> z_0

`denoiser(z_t, t) -> (x0_hat, eps_hat)` takes t as a float tensor (B,) on z_t's device in the
schedule's time units 0..T-1, and returns a consistent pair, z_t = sqrt(abar_t) x0_hat +
sqrt(1 - abar_t) eps_hat; `make_denoiser` builds one from a raw network `model_fn(z_t, t)`.
`callback(i, total, z_t, x0_hat)` runs after the i-th network evaluation (0-based) with the state
that evaluation saw. All noise comes from `generator`. Step coefficients are Python floats
computed from the schedule's CPU float64 tables before the loop, so the loop never waits on the
device. The result is the final sample at t = 0, i.e. the last x0 estimate.

Discrete samplers (ddpm, ddim, dpmpp-2m) visit `steps` integer timesteps chosen by `spacing`:
  "trailing" (default): T-1, T-1-T/steps, ... (Lin et al. 2024, §3.3). Always starts at
      t = T-1, the step a zero-terminal-SNR schedule needs and the noise level z_T ~ N(0, I) is at.
  "leading": (steps-1)k, ..., k, 0 with k = T // steps (DDIM code, Stable Diffusion); never
      visits T-1, so the first state is noisier than the model expects.
  "linspace": round(linspace(T-1, 0, steps)); visits both ends.
After the last timestep they jump to abar = 1 (the data), which returns that step's x0_hat (as
DDPM Alg. 2 does at t = 1). With trailing spacing that last timestep is T/steps - 1, so x0_hat,
a posterior mean, lacks the posterior variance at that noise level: a first-order error that
shrinks with steps (on scaled_linear it dominates DPM-Solver++'s error at 50 steps).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from latentdiff.prior.schedule import NoiseSchedule, check_prediction, posterior_coefficients

Denoiser = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
ModelFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, int, Tensor, Tensor], None]
SPACINGS = ("trailing", "leading", "linspace")


def make_denoiser(model_fn: ModelFn, schedule: NoiseSchedule, prediction: str,
                  clip_x0: float | None = None) -> Denoiser:
    """Wrap a raw network output (eps, x0 or v) into the (x0_hat, eps_hat) a sampler needs.

    With clip_x0 the x0 estimate is clamped to [-clip_x0, clip_x0] and eps recomputed from it, so
    the pair stays consistent. Without that, an eps error at the first step is multiplied by
    sqrt(1 - abar)/sqrt(abar) (~2e4 for cosine's abar_T ~ 2e-9) in x0_hat.
    """
    check_prediction(prediction)
    if prediction == "eps" and schedule.zero_terminal_snr:
        raise ValueError("an eps-prediction model cannot recover z_0 at t = T-1 on a zero-terminal-SNR "
                         "schedule (abar_T = 0, Lin et al. 2024 §3.2); train with prediction 'v' or 'x0', "
                         "or sample with a schedule made with zero_terminal_snr=False")
    if clip_x0 is not None and not clip_x0 > 0:
        raise ValueError(f"clip_x0 must be a positive bound or None, got {clip_x0!r}")

    def denoiser(z_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        x0, eps = schedule.to_x0_eps(model_fn(z_t, t), z_t, t, prediction)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = schedule.eps_from_x0(z_t, x0, t)
        return x0, eps

    return denoiser


# ---- shared parts -----------------------------------------------------------------------------


def _check_steps(schedule: NoiseSchedule, steps: int) -> None:
    if not isinstance(steps, int) or not 1 <= steps <= schedule.T:
        raise ValueError(f"steps must be an integer in 1..{schedule.T} (the schedule's T), got {steps!r}")


def timesteps(T: int, steps: int, spacing: str = "trailing") -> list[int]:
    """The `steps` integer timesteps a discrete sampler visits, decreasing (see module docstring)."""
    if spacing == "trailing":
        ts = (T - torch.arange(steps, dtype=torch.float64) * (T / steps)).round() - 1
    elif spacing == "leading":
        ts = torch.arange(steps - 1, -1, -1, dtype=torch.float64) * (T // steps)
    elif spacing == "linspace":
        ts = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round()
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    return [int(t) for t in ts.tolist()]


def _t_like(z: Tensor, t: float) -> Tensor:
    """t as a float tensor (B,) on z's device; float32 unless z is float64 (t up to 999 in fp16 is too coarse)."""
    dtype = torch.promote_types(z.dtype, torch.float32)
    return torch.full((z.shape[0],), t, device=z.device, dtype=dtype)


def _noise(z: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)


def _abars(schedule: NoiseSchedule, ts: list[int]) -> list[float]:
    """abar at each timestep, as Python floats, plus abar = 1 for the data after the last one."""
    return schedule.alphas_cumprod[ts].tolist() + [1.0]


def _lambda(abar: float) -> float:
    """log-SNR lambda = log(alpha_t / sigma_t) of a VP state; -inf at abar = 0, +inf at abar = 1."""
    if abar == 0.0:
        return -math.inf
    if abar == 1.0:
        return math.inf
    return 0.5 * (math.log(abar) - math.log1p(-abar))


# ---- discrete-time samplers -------------------------------------------------------------------


def sample_ddpm(denoiser: Denoiser, z_T: Tensor, schedule: NoiseSchedule, steps: int, *,
                generator: torch.Generator | None = None, callback: Callback | None = None,
                spacing: str = "trailing") -> Tensor:
    """Ancestral sampling, DDPM Alg. 2: z_s ~ q(z_s | z_t, x0_hat) (eq. 6-7; eq. 11 when x0_hat comes from eps).

    With steps < T the betas between visited timesteps are recomputed (Improved DDPM §4).
    """
    _check_steps(schedule, steps)
    ts = timesteps(schedule.T, steps, spacing)
    abars = _abars(schedule, ts)
    z = z_T
    for i, t in enumerate(ts):
        x0, _ = denoiser(z, _t_like(z, t))
        if callback is not None:
            callback(i, steps, z, x0)
        # betas between the visited timesteps: beta_t' = 1 - abar_t / abar_s (s = next timestep).
        c_x0, c_zt, var = posterior_coefficients(abars[i], abars[i + 1])
        z = c_x0 * x0 + c_zt * z
        if var > 0:  # 0 at the jump to the data
            z = z + math.sqrt(var) * _noise(z, generator)
    return z


def sample_ddim(denoiser: Denoiser, z_T: Tensor, schedule: NoiseSchedule, steps: int, *,
                generator: torch.Generator | None = None, callback: Callback | None = None,
                eta: float = 0.0, spacing: str = "trailing") -> Tensor:
    """DDIM, Song et al. 2021 eq. 12 (sigma_t of eq. 16 scaled by eta; eta = 1 is ancestral DDPM)."""
    _check_steps(schedule, steps)
    ts = timesteps(schedule.T, steps, spacing)
    abars = _abars(schedule, ts)
    z = z_T
    for i, t in enumerate(ts):
        x0, eps = denoiser(z, _t_like(z, t))  # x0 = "predicted x_0", eps = eps_theta(x_t, t)
        if callback is not None:
            callback(i, steps, z, x0)
        a_t, a_s = abars[i], abars[i + 1]  # alpha_t and alpha_{t-1} in the DDIM paper's notation
        sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
        # 1. predicted x_0; 2. "direction pointing to x_t"; 3. random noise.
        z = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - sigma**2, 0.0)) * eps
        if sigma > 0:
            z = z + sigma * _noise(z, generator)
    return z


def sample_dpmpp_2m(denoiser: Denoiser, z_T: Tensor, schedule: NoiseSchedule, steps: int, *,
                    generator: torch.Generator | None = None, callback: Callback | None = None,
                    spacing: str = "trailing") -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 Alg. 2: multistep data prediction in lambda = log(alpha/sigma).

    The first step is first order (no earlier x0_hat); so is the last, to the data, where
    h = inf and the second-order correction vanishes: it returns that step's x0_hat.
    Deterministic; `generator` is accepted for the shared signature and unused.
    """
    _check_steps(schedule, steps)
    ts = timesteps(schedule.T, steps, spacing)
    abars = _abars(schedule, ts)
    z = z_T
    x0_prev, h_prev = None, None
    for i, t in enumerate(ts):
        x0, _ = denoiser(z, _t_like(z, t))
        if callback is not None:
            callback(i, steps, z, x0)
        a_t, a_s = abars[i], abars[i + 1]
        if a_s == 1.0:  # the jump to the data: h = inf, first order gives x0_hat
            return x0
        h = _lambda(a_s) - _lambda(a_t)  # h_i = lambda_{t_i} - lambda_{t_{i-1}}
        if x0_prev is None or math.isinf(h_prev):
            D = x0  # first order (DPM-Solver++ 1 = DDIM)
        else:
            r = h_prev / h  # r_i = h_{i-1} / h_i
            D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        # x_{t_i} = (sigma_{t_i}/sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i
        z = math.sqrt((1 - a_s) / (1 - a_t)) * z - math.sqrt(a_s) * math.expm1(-h) * D
        x0_prev, h_prev = x0, h
    raise AssertionError("unreachable: the last timestep jumps to the data")


# ---- Karras et al. 2022 samplers in the VE variable x = z / sqrt(abar) ---------------------------


KARRAS_SIGMA_MAX = 80.0


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> list[float]:
    """Karras et al. 2022 eq. 5: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, then 0."""
    if steps == 1:
        return [sigma_max, 0.0]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + i / (steps - 1) * (b - a)) ** rho for i in range(steps)] + [0.0]


def _karras_setup(schedule: NoiseSchedule, steps: int, sigma_min: float | None, sigma_max: float | None,
                  rho: float) -> tuple[list[float], list[float]]:
    """Sigmas of eq. 5 within the schedule's range, and the float t of each (t_from_sigma)."""
    _check_steps(schedule, steps)
    # Start at sigma_max = min(the schedule's largest finite sigma, 80), 80 being Karras et al.'s
    # choice (2022, Table 1). Cosine's abar_T ~ 2e-9 puts sigma(T-1) at ~2e4: eq. 5 then spends
    # its few steps at sigmas where the image is pure noise and jumps from ~t=990 to the data
    # (measured: Heun with 10 steps, FID 164 on the demo prior; with the cap, see bench/). At
    # sigma = 80 the signal is 1/80 of the state's scale, so z_T ~ N(0, I) is that state up to
    # a negligible signal; with a zero terminal SNR sigma(T-1) = inf, and the same cap applies.
    sigma_max = min(schedule.sigma_max_finite, KARRAS_SIGMA_MAX) if sigma_max is None else sigma_max
    sigma_min = schedule.sigma_min if sigma_min is None else sigma_min
    if not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    sigmas = karras_sigmas(sigma_min, sigma_max, steps, rho)
    ts = schedule.t_from_sigma(torch.tensor(sigmas[:-1], dtype=torch.float64)).tolist()
    return sigmas, ts


def _denoise_ve(denoiser: Denoiser, x: Tensor, sigma: float, t: float) -> tuple[Tensor, Tensor, Tensor]:
    """Evaluate the VP denoiser at the VE state x: z_t = x sqrt(abar) = x / sqrt(1 + sigma^2).

    Returns (z_t, D(x), d) with d = (x - D(x)) / sigma, which is exactly eps_hat.
    """
    z = x / math.sqrt(1 + sigma**2)
    x0, eps = denoiser(z, _t_like(z, t))
    return z, x0, eps


def sample_euler(denoiser: Denoiser, z_T: Tensor, schedule: NoiseSchedule, steps: int, *,
                 generator: torch.Generator | None = None, callback: Callback | None = None,
                 rho: float = 7.0, sigma_min: float | None = None, sigma_max: float | None = None) -> Tensor:
    """Euler steps on the probability-flow ODE, Karras et al. 2022 Alg. 1 without the Heun correction.

    Deterministic; `generator` is accepted for the shared signature and unused.
    """
    sigmas, ts = _karras_setup(schedule, steps, sigma_min, sigma_max, rho)
    x = z_T * math.sqrt(1 + sigmas[0] ** 2)  # x = z / sqrt(abar)
    for i in range(steps):
        z, x0, d = _denoise_ve(denoiser, x, sigmas[i], ts[i])  # d_i = (x_i - D(x_i; sigma_i)) / sigma_i
        if callback is not None:
            callback(i, steps, z, x0)
        x = x + (sigmas[i + 1] - sigmas[i]) * d  # x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i
    return x  # sigma_N = 0: x is the data, where z = x


def sample_heun(denoiser: Denoiser, z_T: Tensor, schedule: NoiseSchedule, steps: int, *,
                generator: torch.Generator | None = None, callback: Callback | None = None,
                rho: float = 7.0, sigma_min: float | None = None, sigma_max: float | None = None) -> Tensor:
    """Heun's 2nd-order method, Karras et al. 2022 Alg. 1 (Euler on the last step, to sigma = 0).

    Deterministic; `generator` is accepted for the shared signature and unused.
    """
    sigmas, ts = _karras_setup(schedule, steps, sigma_min, sigma_max, rho)
    x = z_T * math.sqrt(1 + sigmas[0] ** 2)
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        z, x0, d = _denoise_ve(denoiser, x, s, ts[i])
        if callback is not None:
            callback(i, steps, z, x0)
        x_next = x + (s_next - s) * d  # 1. Euler step
        if s_next > 0:  # 2. second-order correction with the slope at x_{i+1}
            _, _, d_next = _denoise_ve(denoiser, x_next, s_next, ts[i + 1])
            x_next = x + (s_next - s) * (d + d_next) / 2
        x = x_next
    return x


# ---- registry ---------------------------------------------------------------------------------

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp-2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "heun": sample_heun,
}


def _lookup(name: str) -> Callable[..., Tensor]:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(SAMPLERS)}") from None


def sample(name: str, denoiser: Denoiser, z_T: Tensor, schedule: NoiseSchedule, steps: int, **kw) -> Tensor:
    """Run the sampler registered as `name` (one of SAMPLERS); kw are its keyword options."""
    return _lookup(name)(denoiser, z_T, schedule, steps, **kw)


def number_of_evaluations(name: str, steps: int) -> int:
    """Network evaluations a sampler makes (per guidance pass): Heun needs 2 per step but the last."""
    _lookup(name)
    return 2 * steps - 1 if name == "heun" else steps
