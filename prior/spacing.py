"""The noise levels a sampler visits: `steps` points from pure noise down to the data.

Every sampler takes the options of `Spacing` (the spacing's name and, for "karras" and "logsnr",
rho and the sigma range) and walks the `NoiseLevels` they place: the float timesteps
t_0 > t_1 > ... > t_{N-1} it evaluates the network at, and abar at each, followed by abar = 1
(the data), where it lands with a final step that needs no evaluation.

  "trailing": T-1, T-1-T/N, ..., T/N - 1 (Lin et al. 2024, §3.3). Starts at t = T-1, the noise
      level z_T ~ N(0, I) is at, and the step a zero-terminal-SNR schedule needs; its last level
      T/N - 1 is far from the data at few steps, and the jump from there is a first-order error.
  "leading": (N-1)k, ..., k, 0 with k = T // N (DDIM code, Stable Diffusion); never visits T-1,
      so the first state is noisier than the model expects there.
  "sd-leading": "leading" shifted up by one, (N-1)k+1, ..., k+1, 1: Stable Diffusion 1.x's schedulers
      (diffusers' timestep_spacing "leading" with steps_offset = 1), so a sampler visits its timesteps.
  "linspace": round(linspace(T-1, 0, N)): both ends.
  "karras": Karras et al. 2022 eq. 5 in sigma = sqrt((1 - abar) / abar), rho = 7, from
      min(sigma(T-1), 80) down to sigma(0). Karras et al.'s sigma_max = 80 (Table 1): the cosine
      schedule's own sigma(T-1) ~ 2e4 would spend the few steps on pure noise (docs/prior.md, Samplers).
      Where sigma(T-1) > 80, z_T is taken as the state at sigma = 80 (the figures of
      docs/benchmarks.md were measured so).
  "logsnr": uniform in lambda = log(alpha / sigma) (Lu et al. 2022a, DPM-Solver: the "logSNR"
      time steps) from lambda(min(sigma(T-1), 80)) to lambda(0). Where sigma(T-1) > 80 the first
      level is T-1 itself, where z_T is, and the other N-1 levels follow from sigma = 80.
Karras and log-SNR levels are float timesteps: t_from_sigma inverts the schedule's linear
interpolation of abar, so the network sees the noise level the sampler assumes.

Starting part way (img2img, SDEdit: Meng et al. 2022): `t_start` puts the top of every spacing at
that timestep instead of T-1, and the `steps` levels cover t_start..0 as they would cover T-1..0
(trailing: round(t_start+1 - k (t_start+1)/N) - 1; leading: k = floor(t_start+1) // N; linspace
from round(t_start); karras and logsnr from sigma(t_start), or from 80 where sigma(t_start) is
larger, as above). t_start = T-1 gives exactly the full levels. The sampler's state z_T is then the
state at the first level, abars[0]: the caller noises its latents to that level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .schedule import NoiseSchedule

SPACINGS: tuple[str, ...] = ("trailing", "leading", "sd-leading", "linspace", "karras", "logsnr")
KARRAS_SIGMA_MAX = 80.0


@dataclass(frozen=True)
class NoiseLevels:
    """The levels a sampler visits: N float timesteps, and abar at each plus 1.0 for the data."""

    ts: list[float]  # N timesteps, decreasing, in the schedule's units 0..T-1
    abars: list[float]  # N + 1 values: abar_{t_i}, then 1.0 (the data)
    spacing: str  # the spacing that placed them (one of SPACINGS), for the errors that name it

    @property
    def sigmas(self) -> list[float]:
        """sigma_i = sqrt((1 - abar_i) / abar_i), the VE noise level (Karras eq. 1): inf at abar = 0, 0 at the data."""
        return [math.inf if a == 0.0 else math.sqrt((1 - a) / a) for a in self.abars]

    @property
    def lambdas(self) -> list[float]:
        """log-SNR lambda_i = log(alpha_i / sigma_i) (DPM-Solver's lambda): -inf at abar = 0, +inf at the data."""
        return [log_snr(a) for a in self.abars]


def log_snr(abar: float) -> float:
    """lambda = log(alpha / sigma) = (log abar - log(1 - abar)) / 2 of a VP state."""
    if abar == 0.0:
        return -math.inf
    if abar == 1.0:
        return math.inf
    return 0.5 * (math.log(abar) - math.log1p(-abar))


def check_steps(schedule: NoiseSchedule, steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= schedule.T:
        raise ValueError(f"steps must be an integer in 1..{schedule.T} (the schedule's T), got {steps!r}")


def timesteps(T: float, steps: int, spacing: str = "trailing") -> list[int]:
    """The `steps` integer timesteps of the discrete spacings in 0..T-1, decreasing (see the module docstring).

    T may be a float top + 1 (a start part way, t_start + 1); the timesteps are distinct when steps <= T.
    """
    if spacing == "trailing":
        ts = (T - torch.arange(steps, dtype=torch.float64) * (T / steps)).round() - 1
    elif spacing in ("leading", "sd-leading"):
        ts = torch.arange(steps - 1, -1, -1, dtype=torch.float64) * (int(T) // steps) + (spacing == "sd-leading")
    elif spacing == "linspace":
        ts = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round()
    else:
        raise ValueError(
            f"{spacing!r} is not a discrete timestep spacing; expected trailing, leading, sd-leading or linspace"
        )
    if ts[0] > T - 1:  # sd-leading at one timestep per step: its offset goes past the top
        raise ValueError(
            f"sd-leading with {steps} steps starts at timestep {int(ts[0])}, above the top {T - 1:g}; "
            "use fewer steps or the spacing leading"
        )
    return [int(t) for t in ts.tolist()]


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> list[float]:
    """Karras et al. 2022 eq. 5: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, i < N."""
    if steps == 1:
        return [sigma_max]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + i / (steps - 1) * (b - a)) ** rho for i in range(steps)]


def check_start(schedule: NoiseSchedule, steps: int, t_start: float) -> None:
    """t_start in (0, T-1] leaving at least `steps` timesteps (t_start + 1 >= steps); ValueError otherwise."""
    if not (isinstance(t_start, (int, float)) and 0 < t_start <= schedule.T - 1):
        raise ValueError(f"t_start must be a timestep in (0, {schedule.T - 1}], got {t_start!r}")
    if steps > t_start + 1:
        raise ValueError(
            f"starting at timestep {t_start:g} of {schedule.T} leaves {math.floor(t_start + 1)} "
            f"timesteps, fewer than the {steps} steps asked for: raise the strength or lower the steps"
        )


@dataclass(frozen=True)
class Spacing:
    """Where a sampler's levels go: the options every sampler takes besides its own (samplers.OPTIONS)."""

    spacing: str = "trailing"  # one of SPACINGS (module docstring)
    rho: float = 7.0  # karras: eq. 5's rho
    sigma_min: float | None = None  # karras, logsnr: the lowest sigma (None: the schedule's sigma(0))
    sigma_max: float | None = None  # karras, logsnr: the highest (None: min(the largest finite sigma, 80))

    def levels(self, schedule: NoiseSchedule, steps: int, t_start: float | None = None) -> NoiseLevels:
        """The levels of this spacing for `steps` network evaluations on `schedule`.

        rho, sigma_min and sigma_max shape the continuous spacings ("karras", "logsnr"). t_start: the
        top level's timestep (float, in (0, T-1]; None: T-1, the full range), see the module docstring;
        a sigma_max above sigma(t_start) is lowered to it. Raises ValueError for an unknown spacing,
        bounds outside the schedule's range, or a t_start that leaves fewer than `steps` timesteps.
        """
        spacing, rho, sigma_min, sigma_max = self.spacing, self.rho, self.sigma_min, self.sigma_max
        check_steps(schedule, steps)
        if spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; expected one of {', '.join(SPACINGS)}")
        if t_start is not None:
            check_start(schedule, steps, t_start)
        top = schedule.T if t_start is None else t_start + 1  # as many timesteps as 0..t_start holds
        if spacing in ("trailing", "leading", "sd-leading", "linspace"):
            if (sigma_min, sigma_max) != (None, None):
                raise ValueError(f"sigma_min and sigma_max apply to the karras and logsnr spacings, not {spacing!r}")
            ts = timesteps(top, steps, spacing)
            return NoiseLevels([float(t) for t in ts], schedule.alphas_cumprod[ts].tolist() + [1.0], spacing)
        if not rho > 0:
            raise ValueError(f"rho must be positive, got {rho!r}")
        # sigma at the top level: the schedule's sigma(T-1) (inf with a zero terminal SNR), or sigma(t_start)
        top_sigma = schedule.sigma_max if t_start is None else schedule.sigma(torch.tensor(float(t_start))).item()
        sigma_max = min(schedule.sigma_max_finite, KARRAS_SIGMA_MAX) if sigma_max is None else sigma_max
        if t_start is not None:
            sigma_max = min(sigma_max, top_sigma)
        sigma_min = schedule.sigma_min if sigma_min is None else sigma_min
        lo, hi = schedule.sigma_min, schedule.sigma_max_finite
        if not lo * (1 - 1e-12) <= sigma_min < sigma_max <= hi * (1 + 1e-12):
            raise ValueError(
                f"need {lo:.4g} <= sigma_min < sigma_max <= {hi:.4g} (the schedule's range of finite sigma), "
                f"got sigma_min={sigma_min}, sigma_max={sigma_max}"
            )
        # Where the spacing starts below sigma(T-1), z_T ~ N(0, I) is not yet at its first level: the first
        # evaluation is at T-1 itself, and one DDIM-like step brings z_T to the spacing's start exactly enough
        # (x0_hat barely changes above sigma ~ 80). Treating z_T as the state at sigma_max instead costs a mean
        # error of mu * s_data / sigma_max (0.9% on cosine with Gaussian data, see bench.sampler_accuracy).
        start = [top_sigma] if spacing == "logsnr" and steps > 1 and sigma_max < top_sigma else []
        n = steps - len(start)
        if spacing == "karras":
            sigmas = karras_sigmas(sigma_min, sigma_max, n, rho)
        else:  # lambda = -log(sigma): uniform in log sigma
            sigmas = (
                start + torch.logspace(math.log10(sigma_max), math.log10(sigma_min), n, dtype=torch.float64).tolist()
            )
        s = torch.tensor(sigmas, dtype=torch.float64)
        return NoiseLevels(schedule.t_from_sigma(s).tolist(), (1 / (1 + s**2)).tolist() + [1.0], spacing)
