"""The sampler registry: the one place that says which samplers exist, what they cost, what they take.

Every sampler runs through one call (`sample`):

    sample(name, denoiser, z_T, schedule, steps, *, generator=None, callback=None, t_start=None, **options) -> z_0

generator: one torch.Generator, or one per row of z_T (denoiser.Generators). t_start: start at
that timestep instead of T-1 (img2img, SDEdit), z_T then being the state at the first of the
levels `levels(...)` gives (spacing.py); every sampler and spacing takes it. The samplers
themselves (solvers.py, karras.py) are plain functions, `sample_xxx(denoiser, z_T, walk, **own)
-> z_0`, their update rule alone: `sample` places the levels from the spacing options
(spacing.Spacing) and hands them over in a denoiser.Walk with the generator and the callback.

`SAMPLERS` maps each name to a `SamplerSpec` (function, title, network evaluations per step,
order, default spacing, fewest steps); a sampler's options and their defaults are its function's
keyword parameters followed by the fields of spacing.Spacing (with the spec's default spacing),
and `OPTIONS` gives each option's type and allowed range, so the command line, the pipeline and
the benchmarks derive their choices, help and checks from here. `ALIASES` holds the names users
know from Stable Diffusion front-ends ("DPM++ 2M Karras", "Euler a", ...): a sampler plus preset
options. Names are matched case-insensitively with "++" read as "pp" and spaces as "-".
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from torch import Tensor

from .denoiser import Callback, Denoiser, Generators, Walk, make_denoiser  # noqa: F401  (re-exported: public face)
from .karras import sample_euler, sample_euler_ancestral, sample_heun
from .schedule import NoiseSchedule
from .solvers import sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_unipc
from .spacing import SPACINGS, NoiseLevels, Spacing, check_steps, timesteps  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class Option:
    """One sampler option: its type and allowed values, checked with a message that gives the range."""

    kind: type  # float, int or str
    help: str
    low: float = -math.inf  # inclusive bounds for numbers
    high: float = math.inf
    above: bool = False  # True: low is exclusive (value > low)
    choices: tuple = ()  # for str (and small ints)

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        lo = f"> {self.low:g}" if self.above else f">= {self.low:g}"
        return lo if self.high == math.inf else f"in {'(' if self.above else '['}{self.low:g}, {self.high:g}]"

    def check(self, name: str, value: Any) -> Any:
        if self.kind is str or self.choices:
            if value not in self.choices:
                raise ValueError(f"{name} must be {self.allowed()}, got {value!r}")
            return value
        return check_number(name, value, self.kind, self.low, self.high, self.above)


def check_number(
    name: str, value: Any, kind: type = float, low: float = -math.inf, high: float = math.inf, above: bool = False
) -> Any:
    """value as `kind` (int or float) if finite and in [low, high] ((low, high] with above); else a ValueError
    that names the allowed range, e.g. "guidance must be a finite number >= 0, got nan"."""
    opt = Option(kind, "", low, high, above)
    what = "an integer" if kind is int else "a finite number"
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value))
    if bad or not math.isfinite(value) or not (value > low if above else value >= low) or value > high:
        raise ValueError(f"{name} must be {what} {opt.allowed()}, got {value!r}")
    return kind(value)


OPTIONS: dict[str, Option] = {
    "spacing": Option(str, "the noise levels visited (spacing.py)", choices=SPACINGS),
    "eta": Option(float, "noise injected per step: 0 deterministic, 1 ancestral (DDPM's posterior)", 0.0, 1.0),
    "s_churn": Option(float, "Karras et al. Alg. 2 churn: noise added before each step (0: deterministic)", 0.0),
    "rho": Option(float, "the karras spacing's rho (eq. 5; 7 in the paper)", 0.0, above=True),
    "sigma_min": Option(
        float, "smallest sigma of the karras/logsnr spacings (the schedule's sigma(0))", 0.0, above=True
    ),
    "sigma_max": Option(float, "largest sigma of the karras/logsnr spacings (min(sigma(T-1), 80))", 0.0, above=True),
    "order": Option(int, "UniPC's order p (the corrector makes it p + 1)", choices=(1, 2, 3)),
    "variant": Option(str, "UniPC's B(h): bh1 = h, bh2 = e^h - 1", choices=("bh1", "bh2")),
    "final_order": Option(
        int, "DPM-Solver++(2M)'s last step to the data: 2 (in sigma) or 1 (x0_hat, as diffusers ends)", choices=(1, 2)
    ),
}


@dataclass(frozen=True)
class SamplerSpec:
    name: str  # the canonical name, as in --sampler
    fn: Callable[..., Tensor]
    title: str  # as tables print it
    evaluations_per_step: int  # network evaluations per step (Heun: 2, its last step 1)
    order: int  # convergence order of the deterministic solver (in steps); 0: stochastic by default
    spacing: str = "trailing"  # the default spacing (spacing.SPACINGS)
    min_steps: int = 1  # fewer steps are refused (see `refusal`)
    refusal: str = ""  # what to use instead, in the error for steps < min_steps

    @property
    def options(self) -> dict[str, Any]:
        """The options this sampler takes, with their defaults: its function's keyword parameters, then Spacing's."""
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY} | asdict(Spacing(self.spacing))

    def evaluations(self, steps: int) -> int:
        return self.evaluations_per_step * steps - (self.evaluations_per_step - 1)

    def steps_for(self, budget: int) -> int:
        """The most steps whose network evaluations fit in `budget`."""
        return (budget + self.evaluations_per_step - 1) // self.evaluations_per_step


_SPECS = [
    SamplerSpec("ddpm", sample_ddpm, "DDPM", 1, 0),
    SamplerSpec("ddim", sample_ddim, "DDIM", 1, 1),
    SamplerSpec("dpmpp-2m", sample_dpmpp_2m, "DPM-Solver++(2M)", 1, 2),
    SamplerSpec("euler", sample_euler, "Euler", 1, 1, spacing="karras"),
    SamplerSpec(
        "heun",
        sample_heun,
        "Heun",
        2,
        2,
        spacing="karras",
        min_steps=6,
        refusal="give --steps 6 or more, or use unipc or dpmpp-2m, which take one evaluation per step "
        "(Heun's few large steps degrade images; docs/benchmarks.md, Samplers)",
    ),
    SamplerSpec("euler-a", sample_euler_ancestral, "Euler a", 1, 0, spacing="karras"),
    SamplerSpec("dpmpp-2m-sde", sample_dpmpp_2m_sde, "DPM-Solver++(2M) SDE", 1, 0, spacing="logsnr"),
    SamplerSpec("unipc", sample_unipc, "UniPC", 1, 3),  # trailing spacing: why, docs/benchmarks.md, Samplers
]
SAMPLERS: dict[str, SamplerSpec] = {s.name: s for s in _SPECS}

# Names front-ends use -> (sampler, preset options); the front-ends' own names normalise to the canonical ones
# ("DPM++ 2M" -> dpmpp-2m, "DPM++ 2M SDE" -> dpmpp-2m-sde, "Euler a" -> euler-a, "UniPC" -> unipc).
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "dpmpp-2m-karras": ("dpmpp-2m", {"spacing": "karras"}),
    "dpmpp-2m-sde-karras": ("dpmpp-2m-sde", {"spacing": "karras"}),
    "euler-ancestral": ("euler-a", {}),
    "unipc-karras": ("unipc", {"spacing": "karras"}),
    "dpm-solver++": ("dpmpp-2m", {}),
}
KNOWN_AS = {
    "DPM++ 2M": "dpmpp-2m",
    "DPM++ 2M Karras": "dpmpp-2m-karras",
    "DPM++ 2M SDE": "dpmpp-2m-sde",
    "DPM++ 2M SDE Karras": "dpmpp-2m-sde-karras",
    "Euler a": "euler-a",
    "Euler": "euler",
    "Heun": "heun",
    "DDIM": "ddim",
    "UniPC": "unipc",
}  # what the Stable Diffusion web UI calls them


def normalise(name: str) -> str:
    """'DPM++ 2M Karras' -> 'dpmpp-2m-karras': lower case, '++' as 'pp', spaces and underscores as '-'."""
    return re.sub(r"[\s_]+", "-", name.strip().lower().replace("++", "pp"))


def choices_help() -> str:
    """The --sampler help: every name and alias."""
    aliases = ", ".join(f'"{k}"' for k in KNOWN_AS if normalise(k) in ALIASES)
    return f"{' | '.join(SAMPLERS)}; also {aliases}, ... (any case)"


def resolve(name: str) -> tuple[SamplerSpec, dict[str, Any]]:
    """(spec, preset options) of a sampler name or alias; ValueError naming the known ones."""
    key = normalise(name) if isinstance(name, str) else name
    if key in SAMPLERS:
        return SAMPLERS[key], {}
    if key in ALIASES:
        canonical, preset = ALIASES[key]
        return SAMPLERS[canonical], dict(preset)
    raise ValueError(
        f"unknown sampler {name!r}; known samplers: {', '.join(SAMPLERS)} "
        f"(also {', '.join(repr(k) for k in KNOWN_AS if normalise(k) in ALIASES)})"
    )


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The alias's presets merged with `options` (None values dropped), each checked; ValueError otherwise."""
    spec, merged = resolve(name)
    takes = spec.options
    for key, value in options.items():
        if value is None:
            continue
        if key not in takes:
            which = [s.name for s in SAMPLERS.values() if key in s.options]
            raise ValueError(
                f"sampler {spec.name} takes no option {key!r} (it takes {', '.join(takes) or 'none'}); "
                f"{key} applies to {', '.join(which) or 'no sampler'}"
            )
        merged[key] = value
    return {k: OPTIONS[k].check(k, v) if k in OPTIONS else v for k, v in merged.items()}


def resolve_options(name: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(canonical name, every option it will run with: its defaults, the alias's presets, then `options`)."""
    spec, _ = resolve(name)
    return spec.name, {**spec.options, **check_options(name, options)}


def check_sampler_steps(name: str, steps: int, schedule: NoiseSchedule) -> None:
    """Steps in 1..T, and at least the sampler's minimum (Heun), with what to use instead."""
    check_steps(schedule, steps)
    spec, _ = resolve(name)
    if steps < spec.min_steps:
        raise ValueError(
            f"{spec.name} needs at least {spec.min_steps} steps ({spec.evaluations(spec.min_steps)} "
            f"network evaluations), got {steps}: {spec.refusal}"
        )


def sample(
    name: str,
    denoiser: Denoiser,
    z_T: Tensor,
    schedule: NoiseSchedule,
    steps: int,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    t_start: float | None = None,
    **options,
) -> Tensor:
    """Run the sampler registered as `name` (a name of SAMPLERS or ALIASES) with its checked options.

    t_start: the first level's timestep (None: T-1); z_T is the state at `levels(...).abars[0]`.
    """
    spec, spacing, own = _split(name, options)
    check_sampler_steps(name, steps, schedule)
    walk = Walk(schedule, spacing.levels(schedule, steps, t_start), generator, callback)
    return spec.fn(denoiser, z_T, walk, **own)


def levels(name: str, schedule: NoiseSchedule, steps: int, t_start: float | None = None, **options) -> NoiseLevels:
    """The noise levels sampler `name` visits with these options (spacing.Spacing.levels)."""
    return _split(name, options)[1].levels(schedule, steps, t_start)


def _split(name: str, options: dict[str, Any]) -> tuple[SamplerSpec, Spacing, dict[str, Any]]:
    """(spec, the Spacing, the sampler's own options) that `name` runs with: defaults, then checked `options`."""
    canonical, merged = resolve_options(name, options)
    spacing = Spacing(**{f.name: merged.pop(f.name) for f in fields(Spacing)})
    return SAMPLERS[canonical], spacing, merged


def number_of_evaluations(name: str, steps: int) -> int:
    """Network evaluations a sampler makes for `steps` (per guidance pass): Heun 2 per step but the last."""
    return resolve(name)[0].evaluations(steps)


# ---- the command line's sampler flags -------------------------------------------------------------


def add_sampler_arguments(p) -> None:
    """--sampler, --steps and one flag per option of OPTIONS (--eta, --spacing, --s-churn, ...) on an argparse parser.

    Every flag defaults to None, read as "the run's" (sampler, steps) or "the sampler's" (options);
    `sampler_arguments(args)` collects the options given. Values are checked where they are used.
    """
    p.add_argument("--sampler", help=f"{choices_help()} (default: the run's)")
    p.add_argument("--steps", type=int, help="sampler steps, 1..T (default: the run's sampling.steps)")
    for key, opt in OPTIONS.items():
        takes = [s.name for s in SAMPLERS.values() if key in s.options]
        which = "every sampler" if len(takes) == len(SAMPLERS) else ", ".join(takes)
        p.add_argument(
            f"--{key.replace('_', '-')}",
            dest=f"sampler_{key}",
            type=opt.kind,
            default=None,
            metavar=key.upper(),
            help=f"{opt.help}; {opt.allowed()}; for {which} (default: the sampler's)",
        )


def sampler_arguments(args) -> dict[str, Any]:
    """The sampler options given on the command line (those left at None are dropped)."""
    return {k: getattr(args, f"sampler_{k}") for k in OPTIONS if getattr(args, f"sampler_{k}", None) is not None}
