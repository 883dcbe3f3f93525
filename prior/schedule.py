"""Noise schedules and the conversions between the eps, x0 and v parameterisations.

One `NoiseSchedule` owns abar_t (DDPM's alpha-bar) and everything derived from it: the forward
process q(z_t | z_0) (DDPM eq. 4), the posterior q(z_{t-1} | z_t, z_0) (eq. 6-7), the
parameterisation conversions (eps, x0, v of Salimans & Ho 2022) and the VE sigma of Karras et
al. 2022. The UNet, the samplers and the losses all go through it, so a schedule change is one
object.

Time: t is an index 0..T-1 (the paper's t = 1..T). An integer t tensor indexes the tables; a
float t (what the samplers pass, and what the Karras samplers produce from sigma) interpolates
abar linearly between integers, which is exact at integers and stays finite when abar_{T-1} = 0
(log-SNR would be -inf there).

Zero terminal SNR (Lin et al. 2024, Alg. 1) makes abar_{T-1} = 0: z_{T-1} is pure noise, as it
is at sampling time. Then sigma(T-1) = inf, SNR(T-1) = 0 and z_0 cannot be recovered from an
eps prediction at t = T-1 (x0_from_eps divides 0 by 0). Use prediction "v" or "x0" with it;
`samplers.make_denoiser` refuses "eps" on such a schedule, and the Karras samplers clamp sigma_max
to the largest finite sigma.

Tables are float64 on the CPU; each method takes device and dtype from its tensor arguments,
indexes a float64 copy on that device (float32 on MPS, which has no float64) and casts the
result to the input's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

ScheduleKind = Literal["linear", "scaled_linear", "cosine"]
Prediction = Literal["eps", "x0", "v"]
SCHEDULE_KINDS: tuple[str, ...] = get_args(ScheduleKind)
PREDICTIONS: tuple[str, ...] = get_args(Prediction)


def check_prediction(prediction: str) -> None:
    """Raise a ValueError naming the known parameterisations if `prediction` is not one."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def _betas(kind: str, T: int, beta_start: float | None, beta_end: float | None) -> Tensor:
    """beta_1..beta_T (float64, (T,)) of the named schedule."""
    if kind in ("linear", "scaled_linear"):
        # The published endpoints are for T = 1000; scaling them by 1000/T keeps abar_T about the
        # same for other T (Improved DDPM, Nichol & Dhariwal 2021, get_named_beta_schedule).
        scale = 1000.0 / T
        start = beta_start if beta_start is not None else scale * (1e-4 if kind == "linear" else 0.00085)
        end = beta_end if beta_end is not None else scale * (0.02 if kind == "linear" else 0.012)
        if kind == "linear":  # DDPM (Ho et al. 2020), section 4
            return torch.linspace(start, end, T, dtype=torch.float64)
        # Stable Diffusion: linear in sqrt(beta).
        return torch.linspace(math.sqrt(start), math.sqrt(end), T, dtype=torch.float64) ** 2
    if kind == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("beta_start/beta_end apply to 'linear' and 'scaled_linear', not 'cosine'")
        # Nichol & Dhariwal 2021 eq. 17: abar(t) = f(t)/f(0), f(t) = cos((t/T + s)/(1 + s) * pi/2)^2,
        # beta_t = 1 - abar_t/abar_{t-1} clipped at 0.999 so the last step is not singular.
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown noise schedule {kind!r}; expected one of {SCHEDULE_KINDS}")


def _rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2024, Alg. 1: shift and scale sqrt(abar) so sqrt(abar_T) = 0, sqrt(abar_1) kept."""
    sqrt_abar = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def posterior_coefficients(abar_t, abar_s):
    """q(z_s | z_t, z_0) for s < t (DDPM eq. 7; Improved DDPM §4 for respaced s = t - k).

    Returns (c_x0, c_zt, var) with mu_tilde = c_x0 z_0 + c_zt z_t and beta_tilde = var, where
    beta_t' = 1 - abar_t/abar_s and alpha_t' = abar_t/abar_s are the betas between s and t.
    Works on Python floats (the samplers) and on tensors (`NoiseSchedule.posterior`).
    """
    alpha = abar_t / abar_s
    beta = 1 - alpha
    c_x0 = abar_s**0.5 * beta / (1 - abar_t)
    c_zt = alpha**0.5 * (1 - abar_s) / (1 - abar_t)
    var = (1 - abar_s) / (1 - abar_t) * beta
    return c_x0, c_zt, var


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete variance-preserving schedule; build one with `NoiseSchedule.make`."""

    kind: str  # the schedule it was built from: "linear", "scaled_linear" or "cosine"
    zero_terminal_snr: bool  # abar_{T-1} rescaled to exactly 0 (Lin et al. 2024, Alg. 1)
    betas: Tensor  # (T,) float64 CPU, beta_t of DDPM eq. 2
    alphas: Tensor  # (T,) float64 CPU, alpha_t = 1 - beta_t
    alphas_cumprod: Tensor  # (T,) float64 CPU, abar_t = prod_{s<=t} alpha_s (DDPM eq. 4)
    # device -> abar padded with abar_{-1} = 1 in front, so index t + 1 is abar_t and t is abar_{t-1}.
    _padded: dict = field(default_factory=dict, init=False, repr=False)

    @staticmethod
    def make(
        kind: str,
        T: int = 1000,
        zero_terminal_snr: bool = False,
        beta_start: float | None = None,
        beta_end: float | None = None,
    ) -> NoiseSchedule:
        """Build a named schedule with T steps; beta_start/beta_end override the linear endpoints."""
        if not isinstance(T, int) or T < 2:
            raise ValueError(f"a noise schedule needs an integer number of steps T >= 2, got {T!r}")
        betas = _betas(kind, T, beta_start, beta_end)
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(
                f"betas of the {kind!r} schedule with T={T} fall outside (0, 1); "
                "use a larger T or smaller beta_start/beta_end"
            )
        if zero_terminal_snr:
            betas = _rescale_zero_terminal_snr(betas)
        alphas = 1 - betas
        return NoiseSchedule(kind, zero_terminal_snr, betas, alphas, torch.cumprod(alphas, 0))

    @property
    def T(self) -> int:
        return self.betas.shape[0]

    # ---- abar at t ---------------------------------------------------------------------------

    def _table(self, device: torch.device) -> Tensor:
        table = self._padded.get(device)
        if table is None:
            ones = torch.ones(1, dtype=torch.float64)
            table = torch.cat([ones, self.alphas_cumprod])
            dtype = torch.float32 if device.type == "mps" else torch.float64
            table = self._padded[device] = table.to(device=device, dtype=dtype)
        return table

    def abar(self, t: Tensor) -> Tensor:
        """abar_t, same shape and device as t, float64 (float32 on MPS).

        Integer t indexes the table; float t interpolates linearly between integers and is
        clamped to [0, T-1] (no error: checking would synchronise with the device).
        """
        table = self._table(t.device)
        if not t.is_floating_point():
            return table[t.long() + 1]
        t = t.to(table.dtype).clamp(0, self.T - 1)
        i0 = t.floor().clamp(max=self.T - 2)
        w = t - i0
        i0 = i0.long() + 1
        return torch.lerp(table[i0], table[i0 + 1], w)

    def _abar_prev(self, t: Tensor) -> Tensor:
        """abar_{t-1} for integer t, with abar_{-1} = 1 (DDPM's x_0 is the data)."""
        if t.is_floating_point():
            raise TypeError("the one-step posterior needs an integer timestep tensor t")
        return self._table(t.device)[t.long()]

    @staticmethod
    def _like(c: Tensor, x: Tensor) -> Tensor:
        """Cast a per-sample coefficient (B,) to x's dtype and shape it (B, 1, ..., 1) to broadcast."""
        return c.to(x.dtype).reshape(c.shape + (1,) * (x.ndim - c.ndim))

    def _sqrt_coefs(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) shaped to broadcast against x."""
        abar = self.abar(t.to(x.device))
        return self._like(abar.sqrt(), x), self._like((1 - abar).sqrt(), x)

    # ---- forward process and posterior -------------------------------------------------------

    def q_sample(self, z0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps (DDPM eq. 4)."""
        a, s = self._sqrt_coefs(t, z0)
        return a * z0 + s * eps

    def posterior(self, z0: Tensor, z_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(mu_tilde, beta_tilde) of q(z_{t-1} | z_t, z_0) (DDPM eq. 6-7), integer t.

        beta_tilde has shape (B, 1, ..., 1) and is 0 at t = 0, where z_{t-1} is the data.
        """
        t = t.to(z_t.device)
        c_x0, c_zt, var = posterior_coefficients(self.abar(t), self._abar_prev(t))
        mu = self._like(c_x0, z_t) * z0 + self._like(c_zt, z_t) * z_t
        return mu, self._like(var, z_t)

    # ---- parameterisations: z_t = sqrt(abar) x0 + sqrt(1-abar) eps, v = sqrt(abar) eps - sqrt(1-abar) x0

    def x0_from_eps(self, z_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x0 = (z_t - sqrt(1-abar) eps) / sqrt(abar); undefined where abar = 0 (zero terminal SNR)."""
        a, s = self._sqrt_coefs(t, z_t)
        return (z_t - s * eps) / a

    def eps_from_x0(self, z_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """eps = (z_t - sqrt(abar) x0) / sqrt(1-abar); 1 - abar > 0 for every t since beta_1 > 0."""
        a, s = self._sqrt_coefs(t, z_t)
        return (z_t - a * x0) / s

    def v_from(self, z0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(abar) eps - sqrt(1-abar) x0 (Salimans & Ho 2022, section 4)."""
        a, s = self._sqrt_coefs(t, z0)
        return a * eps - s * z0

    def x0_from_v(self, z_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
        """x0 = sqrt(abar) z_t - sqrt(1-abar) v (Salimans & Ho 2022, appendix D)."""
        a, s = self._sqrt_coefs(t, z_t)
        return a * z_t - s * v

    def eps_from_v(self, z_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
        """eps = sqrt(1-abar) z_t + sqrt(abar) v."""
        a, s = self._sqrt_coefs(t, z_t)
        return s * z_t + a * v

    def to_x0_eps(self, output: Tensor, z_t: Tensor, t: Tensor, prediction: str) -> tuple[Tensor, Tensor]:
        """Turn a network output in the given parameterisation into the pair (x0_hat, eps_hat)."""
        if prediction == "eps":
            return self.x0_from_eps(z_t, output, t), output
        if prediction == "x0":
            return output, self.eps_from_x0(z_t, output, t)
        if prediction == "v":
            return self.x0_from_v(z_t, output, t), self.eps_from_v(z_t, output, t)
        check_prediction(prediction)
        raise AssertionError("unreachable")

    def target(self, prediction: str, z0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The training target for a network predicting `prediction` from z_t = q_sample(z0, t, eps)."""
        check_prediction(prediction)
        if prediction == "eps":
            return eps
        if prediction == "x0":
            return z0
        return self.v_from(z0, eps, t)

    # ---- SNR and the VE sigma ----------------------------------------------------------------

    def snr(self, t: Tensor) -> Tensor:
        """SNR(t) = abar_t / (1 - abar_t) (Kingma et al. 2021); 0 at a zero terminal SNR."""
        abar = self.abar(t)
        return abar / (1 - abar)

    def sigma(self, t: Tensor) -> Tensor:
        """sigma(t) = sqrt((1 - abar_t) / abar_t): x = z_t / sqrt(abar_t) is x_0 + sigma eps (Karras eq. 1)."""
        abar = self.abar(t)
        return ((1 - abar) / abar).sqrt()

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        """The float t with sigma(t) = sigma, inverting the interpolation of `abar` exactly.

        Raises ValueError for a sigma outside [sigma(0), sigma(T-1)] (or NaN): no t has it, and a clamped t
        would tell the network less (or more) noise than its input holds.
        """
        lo, hi = self.sigma_min, self.sigma_max
        inside = (sigma >= lo * (1 - 1e-9)) & (sigma <= hi * (1 + 1e-9))  # NaN is outside
        if not bool(inside.all()):
            bad = sigma[~inside].reshape(-1)[0].item()
            raise ValueError(
                f"sigma {bad:.6g} is outside the schedule's range [{lo:.6g}, {hi:.6g}]: no timestep has that noise "
                "level (lower the sampler's sigma_max or churn)"
            )
        table = self._table(sigma.device)[1:]  # abar_0 .. abar_{T-1}, decreasing
        abar = 1 / (1 + sigma.to(table.dtype) ** 2)  # sigma = inf gives abar = 0
        # i = first index with abar_i <= abar, so the segment [i-1, i] brackets it.
        i = torch.searchsorted(-table, -abar.reshape(-1).contiguous()).reshape(abar.shape)
        i = i.clamp(1, self.T - 1)
        hi, lo = table[i - 1], table[i]
        w = ((hi - abar) / (hi - lo)).clamp(0, 1)
        return (i - 1).to(table.dtype) + w

    @property
    def sigma_min(self) -> float:
        """sigma at t = 0."""
        return math.sqrt((1 - self.alphas_cumprod[0].item()) / self.alphas_cumprod[0].item())

    @property
    def sigma_max(self) -> float:
        """sigma at t = T-1; math.inf with a zero terminal SNR."""
        abar = self.alphas_cumprod[-1].item()
        return math.inf if abar == 0 else math.sqrt((1 - abar) / abar)

    @property
    def sigma_max_finite(self) -> float:
        """The largest finite sigma: sigma_max, or sigma at t = T-2 when abar_{T-1} = 0."""
        finite = self.alphas_cumprod[self.alphas_cumprod > 0]
        abar = finite[-1].item()
        return math.sqrt((1 - abar) / abar)
