"""The sampler registry, spacings, the samplers users know by name, guidance rescale and interval, generate options.

Accuracy is checked against the exact denoiser of Gaussian data (bench.sampler_accuracy), where a
deterministic sampler's output law is known exactly; the 4-D Gaussian checks of every sampler and
their convergence orders live in test_diffusion_math.py.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from bench.sampler_accuracy import MU, STD, gaussian_denoiser, output_moments
from latentdiff.prior.config import SamplingConfig
from latentdiff.prior.guidance import cfg_model_fn, check_interval, in_interval, rescale_guidance
from latentdiff.prior.samplers import (
    ALIASES,
    KNOWN_AS,
    OPTIONS,
    SAMPLERS,
    check_options,
    levels,
    make_denoiser,
    normalise,
    number_of_evaluations,
    resolve,
    resolve_options,
    sample,
)
from latentdiff.prior.schedule import NoiseSchedule
from latentdiff.prior.spacing import SPACINGS, Spacing
from latentdiff.scripts import cli
from latentdiff.scripts.generate import grid_title

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["scaled_linear", "cosine"])
def test_default_sampler_within_one_percent_at_20_evaluations(kind):
    """Issue 14's goal: data N(0.5, 0.7^2), T = 1000, z_T from the exact marginal, 20 network evaluations."""
    name = SamplingConfig().sampler
    schedule = NoiseSchedule.make(kind)
    steps = SAMPLERS[resolve(name)[0].name].steps_for(20)
    assert number_of_evaluations(name, steps) == 20
    mean, std = output_moments(name, schedule, steps)
    assert abs(std / STD - 1) < 0.01 and abs(mean / MU - 1) < 0.01, (mean, std)
    # The check can fail: DDIM at the same budget is ~6-9% off (docs/benchmarks.md table).
    _, std_ddim = output_moments("ddim", schedule, 20)
    assert abs(std_ddim / STD - 1) > 0.05


def test_names_users_know_resolve_with_their_presets():
    for known, name in KNOWN_AS.items():
        spec, preset = resolve(known)
        canonical, expected = ALIASES.get(name, (name, {}))
        assert spec.name == canonical and preset == expected, known
    assert resolve("DPM++ 2M Karras")[1] == {"spacing": "karras"} and normalise("Euler a") == "euler-a"
    assert resolve_options("dpm++ 2m karras", {"rho": 5.0}) == (
        "dpmpp-2m",
        {**SAMPLERS["dpmpp-2m"].options, "spacing": "karras", "rho": 5.0},
    )
    schedule = NoiseSchedule.make("scaled_linear")
    den, z = gaussian_denoiser(schedule), torch.linspace(-2, 2, 5, dtype=F64)[:, None]
    torch.testing.assert_close(
        sample("DPM++ 2M Karras", den, z, schedule, 10),
        sample("dpmpp-2m", den, z, schedule, 10, spacing="karras"),
        rtol=0,
        atol=0,
    )
    with pytest.raises(ValueError, match="known samplers: .*'DPM\\+\\+ 2M Karras'"):
        resolve("DPM++ 3M Karras")


@pytest.mark.parametrize("spacing", ["karras", "trailing"])
def test_euler_is_ddim_and_euler_ancestral_is_ddim_with_eta(spacing):
    """Karras et al.'s Euler step in x = z / alpha is DDIM's eq. 12 in z; the ancestral split is DDIM with eta."""
    schedule = NoiseSchedule.make("linear")
    den, z = gaussian_denoiser(schedule), torch.randn(64, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(
        sample("euler", den, z, schedule, 12, spacing=spacing),
        sample("ddim", den, z, schedule, 12, spacing=spacing),
        rtol=0,
        atol=1e-10,
    )
    for eta in (1.0, 0.5):
        runs = [
            sample(name, den, z, schedule, 12, spacing=spacing, eta=eta, generator=torch.Generator().manual_seed(1))
            for name in ("Euler a", "ddim")
        ]
        torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-10)


def test_sde_sampler_keeps_the_law_and_differs_by_seed():
    """DPM++ 2M SDE (eta = 1) lands on the data's law; its noise comes from the generator."""
    schedule = NoiseSchedule.make("scaled_linear")
    mean, std = output_moments("DPM++ 2M SDE", schedule, 50, n=100_000)
    assert abs(std / STD - 1) < 0.02 and abs(mean / MU - 1) < 0.02, (mean, std)
    den, z = gaussian_denoiser(schedule), torch.zeros(8, 1, dtype=F64)
    a, b = (sample("dpmpp-2m-sde", den, z, schedule, 10, generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    assert not torch.allclose(a, b)
    # eta = 0 is deterministic and agrees with DPM-Solver++(2M) but for the last step (first order there).
    c = sample("dpmpp-2m-sde", den, z + 1, schedule, 50, eta=0.0)
    assert (c - sample("dpmpp-2m", den, z + 1, schedule, 50, spacing="karras")).abs().max() < 2e-3


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_sampler_takes_every_spacing(name, spacing):
    schedule = NoiseSchedule.make("linear")
    steps = max(SAMPLERS[name].min_steps, 8)
    mean, std = output_moments(name, schedule, steps, n=4000, spacing=spacing)
    assert math.isfinite(mean) and math.isfinite(std) and 0.2 < std < 2.0


def test_spacings_place_their_levels():
    cosine, linear, sd = (NoiseSchedule.make(k) for k in ("cosine", "linear", "scaled_linear"))
    lv = Spacing("logsnr").levels(sd, 10)  # sigma(T-1) = 14.6: uniform log-SNR from there
    lam = torch.tensor(lv.lambdas[:-1], dtype=F64)
    assert lv.ts[0] == pytest.approx(999) and lv.ts[-1] == pytest.approx(0, abs=1e-6)
    torch.testing.assert_close(lam.diff(), torch.full((9,), float(lam.diff().mean()), dtype=F64))  # uniform
    # cosine's sigma(T-1) ~ 2e4: z_T is evaluated where it is, then uniform log-SNR from sigma = 80
    lv = Spacing("logsnr").levels(cosine, 10)
    assert lv.ts[0] == pytest.approx(999) and lv.sigmas[1] == pytest.approx(80.0)
    kr = Spacing("karras", rho=7.0).levels(cosine, 10)
    assert kr.sigmas[0] == pytest.approx(80.0) and kr.sigmas[-2] == pytest.approx(cosine.sigma_min)
    assert all(a > b for a, b in zip(kr.sigmas, kr.sigmas[1:])) and kr.abars[-1] == 1.0
    with pytest.raises(ValueError, match="the schedule's range of finite sigma"):
        Spacing("karras", sigma_max=500.0).levels(linear, 10)
    with pytest.raises(ValueError, match="sigma_min and sigma_max apply to the karras and logsnr"):
        Spacing("trailing", sigma_max=5.0).levels(linear, 10)


def test_heun_below_eleven_evaluations_is_refused_with_what_works():
    schedule = NoiseSchedule.make("cosine")
    den, z = gaussian_denoiser(schedule), torch.zeros(2, 1, dtype=F64)
    with pytest.raises(ValueError, match=r"heun needs at least 6 steps \(11 network evaluations\), got 5: .*unipc"):
        sample("heun", den, z, schedule, 5)
    assert sample("heun", den, z, schedule, 6).shape == (2, 1)


def test_options_are_checked_with_their_range():
    for bad in (float("nan"), -1.0, 1.5, float("inf")):
        with pytest.raises(ValueError, match=r"eta must be a finite number in \[0, 1\]"):
            check_options("ddim", {"eta": bad})
    with pytest.raises(ValueError, match="takes no option 'eta'.*eta applies to ddim, euler-a, dpmpp-2m-sde"):
        check_options("dpmpp-2m", {"eta": 0.5})
    with pytest.raises(ValueError, match="spacing must be one of trailing, leading, sd-leading, linspace, karras"):
        check_options("ddim", {"spacing": "uniform"})
    with pytest.raises(ValueError, match=r"s_churn must be a finite number >= 0"):
        check_options("heun", {"s_churn": -0.5})
    with pytest.raises(ValueError, match="order must be one of 1, 2, 3"):
        check_options("unipc", {"order": 4})
    assert check_options("ddim", {"eta": 1, "spacing": None}) == {"eta": 1.0}
    # every option some sampler takes is described, and every sampler's options are known ones
    assert set().union(*(s.options for s in SAMPLERS.values())) == set(OPTIONS)


# ---- guidance rescale -----------------------------------------------------------------------------


def _two_outputs(B=6):
    g = torch.Generator().manual_seed(0)
    cond_out = torch.randn(B, 4, 3, 3, generator=g, dtype=F64) * torch.rand(B, 1, 1, 1, generator=g, dtype=F64)
    uncond_out = 0.3 * torch.randn(B, 4, 3, 3, generator=g, dtype=F64)

    def model(z, t, c):  # c selects the half: 1 conditional, 0 unconditional
        return torch.where(
            c[:, None, None, None] > 0, cond_out.repeat(2, 1, 1, 1)[: len(c)], uncond_out.repeat(2, 1, 1, 1)[: len(c)]
        )

    return model, cond_out, uncond_out, torch.ones(B), torch.zeros(B)


def test_guidance_rescale_zero_is_plain_guidance_and_one_matches_the_conditional_std():
    model, c_out, u_out, cond, uncond = _two_outputs()
    z, t = torch.zeros(6, 4, 3, 3, dtype=F64), torch.full((6,), 500.0, dtype=F64)
    plain = u_out + 7.5 * (c_out - u_out)
    torch.testing.assert_close(cfg_model_fn(model, cond, uncond, 7.5)(z, t), plain)
    torch.testing.assert_close(cfg_model_fn(model, cond, uncond, 7.5, rescale=0.0)(z, t), plain)
    full = cfg_model_fn(model, cond, uncond, 7.5, rescale=1.0)(z, t)
    torch.testing.assert_close(full.flatten(1).std(1), c_out.flatten(1).std(1))  # per sample
    assert not torch.allclose(plain.flatten(1).std(1), c_out.flatten(1).std(1))
    half = cfg_model_fn(model, cond, uncond, 7.5, rescale=0.5)(z, t)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * plain)  # phi x_rescaled + (1 - phi) x_cfg
    flat = torch.ones(2, 3)  # a constant guided output stays as it is, not inf / nan
    torch.testing.assert_close(rescale_guidance(flat, torch.randn(2, 3), 1.0), flat)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"guidance rescale in \[0, 1\]"):
            cfg_model_fn(model, cond, uncond, 7.5, rescale=bad)


# ---- guidance interval ----------------------------------------------------------------------------


def test_guidance_interval_guides_inside_only_and_skips_the_unconditional_pass_outside():
    model, c_out, u_out, cond, uncond = _two_outputs()
    passes = []

    def counting(z, t, c):
        passes.append(len(c))
        return model(z, t, c)

    z = torch.zeros(6, 4, 3, 3, dtype=F64)
    guided = in_interval(lambda t: t / 100, (2.0, 5.0))  # sigma = t / 100: guide where 200 < t <= 500
    fn = cfg_model_fn(counting, cond, uncond, 7.5, guided=guided)
    plain = u_out + 7.5 * (c_out - u_out)
    torch.testing.assert_close(fn(z, torch.full((6,), 500.0, dtype=F64)), plain)  # the closed upper end
    assert passes == [12]
    for outside in (200.0, 900.0):  # the open lower end, and above the interval: one pass over B
        passes.clear()
        torch.testing.assert_close(fn(z, torch.full((6,), outside, dtype=F64)), c_out)
        assert passes == [6]
    t = torch.tensor([100.0, 300.0, 400.0, 600.0, 250.0, 800.0], dtype=F64)  # rows at different levels
    inside = torch.tensor([False, True, True, False, True, False])
    torch.testing.assert_close(fn(z, t), torch.where(inside[:, None, None, None], plain, c_out))


@pytest.mark.parametrize(
    "bad, message",
    [
        ((5.0, 1.0), "0 <= sigma_lo < sigma_hi"),
        ((-1, 2), "0 <= sigma_lo"),
        ((1, float("nan")), "sigma_lo < sigma_hi"),
        ((1,), "two numbers"),
        ("ab", "two numbers"),
        ("1,2,3", "two numbers"),
        ((math.inf, math.inf), "sigma_lo"),
    ],
)
def test_guidance_interval_refuses_what_is_not_an_interval(bad, message):
    with pytest.raises(ValueError, match=message):
        check_interval(bad)
    assert check_interval("0.5, inf") == (0.5, math.inf) and check_interval("all") is check_interval(None) is None


def test_guidance_interval_over_every_level_is_plain_guidance_and_over_none_is_the_conditional_model(pipe):
    kw = dict(n=2, steps=4, seed=3, sampler="dpmpp-2m", guidance=4.0)
    plain = pipe("a red circle", **kw)
    assert torch.equal(pipe("a red circle", guidance_interval=(0.0, math.inf), **kw), plain)
    # No level lies in (above, 2 above]: the finite ones are at most sigma_max_finite, and a zero-terminal-SNR
    # schedule's first level, sigma = inf, is above it.
    above = pipe.schedule.sigma_max_finite + 1
    conditional = pipe("a red circle", **{**kw, "guidance": 1.0})
    assert torch.equal(pipe("a red circle", guidance_interval=(above, 2 * above), **kw), conditional)
    middle = pipe("a red circle", guidance_interval=(0.5, 10.0), **kw)
    title = grid_title(pipe.settings("a red circle", guidance_interval="0.5,10", guidance_rescale=0.7, **kw))
    assert title == "dpmpp-2m, 4 steps, guidance 4 for sigma in (0.5, 10], guidance rescale 0.7, seed 3"
    # A sampler option away from its default changes the images, so the title names it (the demo's grid: Karras levels)
    karras = pipe.settings("a red circle", sampler_options={"spacing": "karras", "rho": 5.0}, **kw)
    assert grid_title(karras) == "dpmpp-2m, rho 5, spacing karras, 4 steps, guidance 4, seed 3"
    assert grid_title(pipe.settings("a red circle", sampler_options={"spacing": "trailing"}, **kw)).startswith(
        "dpmpp-2m, 4 steps"
    )
    assert not torch.equal(middle, plain) and not torch.equal(middle, conditional)  # the tiny prior guides weakly


# ---- latentdiff generate's numeric options ----------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], r"steps must be an integer in 1\.\.1000"),
        (["--steps", "5", "--sampler", "heun"], "heun needs at least 6 steps"),
        (["--guidance", "nan"], "guidance must be a finite number >= 0, got nan"),
        (["--guidance", "-2"], "guidance must be a finite number >= 0"),
        (["--guidance-rescale", "2"], r"guidance_rescale must be a finite number in \[0, 1\]"),
        (["--guidance-interval", "5,1"], r"guidance interval needs 0 <= sigma_lo < sigma_hi, got \(5, 1\)"),
        (["--guidance-interval", "0.5"], "two numbers"),
        (["--eta", "-1", "--sampler", "ddim"], r"eta must be a finite number in \[0, 1\], got -1"),
        (["--eta", "0.5", "--sampler", "dpmpp-2m"], "takes no option 'eta'"),
        (["--n", "0"], r"n \(images per prompt\) must be an integer >= 1, got 0"),
        (["--batch-size", "0"], "batch_size must be an integer >= 1"),
        (["--seed", "-1"], "seed must be an integer in"),
        (["--rho", "0", "--sampler", "DPM++ 2M Karras"], "rho must be a finite number > 0"),
        (["--sampler", "plms"], "unknown sampler 'plms'"),
    ],
)
def test_generate_refuses_bad_numbers_with_the_range(prior_run, tmp_path, capsys, flags, message):
    out = tmp_path / "gen"
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "a red circle", "--run", str(prior_run[0]), "--out", str(out), *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not out.exists() or not any(out.iterdir())  # no image or settings written


def test_generate_takes_names_users_know_and_records_every_option(prior_run, tmp_path):
    out = tmp_path / "gen"
    assert (
        cli.main(
            [
                "generate",
                "a red circle",
                "--run",
                str(prior_run[0]),
                "--n",
                "1",
                "--steps",
                "3",
                "--sampler",
                "DPM++ 2M Karras",
                "--guidance-rescale",
                "0.7",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    settings = json.loads((out / "settings.json").read_text())
    assert settings["sampler"] == "dpmpp-2m" and settings["sampler_options"]["spacing"] == "karras"
    assert settings["guidance_rescale"] == 0.7 and set(settings["sampler_options"]) == set(SAMPLERS["dpmpp-2m"].options)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], r"steps must be an integer in 1\.\.1000"),
        (["--guidance", "1,nan"], "--guidance must be a finite number >= 0, got nan"),
        (["--eta", "2", "--sampler", "euler-a"], r"eta must be a finite number in \[0, 1\], got 2"),
        (["--guidance-rescale", "-1"], r"guidance_rescale must be a finite number in \[0, 1\]"),
        (["--guidance-interval", "1,x"], "two numbers"),
        (["--order", "5", "--sampler", "unipc"], "order must be one of 1, 2, 3"),
    ],
)
def test_evaluate_refuses_bad_sampler_flags_before_loading_anything_else(prior_run, tmp_path, capsys, flags, message):
    # --classifier names no run: the sampler flags must be refused before it is read.
    with pytest.raises(SystemExit) as exc:
        cli.main(
            [
                "evaluate",
                "--run",
                str(prior_run[0]),
                "--data",
                str(tmp_path / "no-data"),
                "--classifier",
                str(tmp_path / "no-classifier"),
                *flags,
            ]
        )
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


# ---- UniPC from a zero-terminal-SNR start ---------------------------------------------------------


def _polynomial_x0(schedule: NoiseSchedule, coefs: tuple[float, ...]):
    """A denoiser whose x0_hat is the polynomial sum_j c_j lambda^j of the level alone (0 at lambda = -inf).

    It ignores z_t, so the probability-flow ODE is linear and its exact step from level s to t is
    z_t = (sigma_t / sigma_s) z_s + sigma_t [F(lambda_t) - F(lambda_s)], F the antiderivative of e^lambda P(lambda).
    """

    def model_fn(z, t):
        a = schedule.abar(t).to(z.dtype).reshape(-1, *([1] * (z.ndim - 1)))
        lam = 0.5 * (a / (1 - a)).log()
        x0 = sum(c * lam**j for j, c in enumerate(coefs))
        return torch.where(a > 0, x0, torch.zeros_like(x0)).expand_as(z)

    def F(lam: float) -> float:  # int e^lambda lambda^j = e^lambda sum_k (-1)^k j! / (j-k)! lambda^(j-k)
        return math.exp(lam) * sum(
            c * sum((-1) ** k * math.factorial(j) / math.factorial(j - k) * lam ** (j - k) for k in range(j + 1))
            for j, c in enumerate(coefs)
        )

    return make_denoiser(model_fn, schedule, "x0"), F


@pytest.mark.parametrize(
    "order, coefs, exact_from", [(2, (0.3, 0.2), 1), (3, (0.3, 0.2), 1), (3, (0.3, 0.2, -0.05), 2)]
)
def test_unipc_drops_only_the_infinite_level(order, coefs, exact_from):
    """UniPC-p is exact where x0_hat is a polynomial of degree < its order in lambda and it holds enough points.

    On a zero-terminal-SNR schedule the trailing walk starts at abar = 0 (lambda = -inf): that level gives no
    slope, but every later one does. From the level where enough finite points are at hand (the corrector adds
    one), each step must be the exact one; the bug threw all earlier points away while the first was among
    them, five first-order updates in the first four steps.
    """
    schedule = NoiseSchedule.make("cosine", zero_terminal_snr=True)
    den, F = _polynomial_x0(schedule, coefs)
    steps = 8
    lv = levels("unipc", schedule, steps, spacing="trailing")
    assert math.isinf(lv.lambdas[0])
    seen: dict[int, torch.Tensor] = {}
    z_T = torch.tensor([[-1.0], [0.5], [2.0]], dtype=F64)
    sample(
        "unipc",
        den,
        z_T,
        schedule,
        steps,
        spacing="trailing",
        order=order,
        callback=lambda i, n, z, x0: seen.update({i: z}),
    )
    sig, lam = [math.sqrt(1 - a) for a in lv.abars], lv.lambdas  # the VP sigma_t (lv.sigmas is Karras's sigma/alpha)
    for i in range(exact_from, steps - 1):
        exact = sig[i + 1] / sig[i] * seen[i] + sig[i + 1] * (F(lam[i + 1]) - F(lam[i]))
        torch.testing.assert_close(seen[i + 1], exact, rtol=1e-9, atol=1e-11, msg=lambda m: f"step {i} -> {i + 1}: {m}")


# ---- Karras churn ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize("kind", ["scaled_linear", "linear"])
def test_churn_tells_the_network_the_noise_its_input_has(name, kind):
    """Alg. 2 raises sigma to sigma_hat = sigma (1 + gamma); the t the network is given must have sigma(t) = sigma_hat.

    The Karras levels start at the schedule's sigma(T-1) here (14.6 for scaled_linear; linear's 157 by the
    sigma_max option), so an uncapped gamma put sigma_hat above every t, and the network was told sigma(T-1)
    while its input held more noise. Data at 0 (x0_hat = 0, its exact denoiser) and two rows drawing the same
    churn noise: the noise cancels in their difference, which in x = z sqrt(1 + sigma^2) Euler scales by
    sigma_{i+1} / sigma_hat_i, so each evaluation's (z, t) must agree with the one before.
    """
    schedule = NoiseSchedule.make(kind)
    calls: list[tuple[torch.Tensor, float]] = []

    def model_fn(z, t):
        calls.append((z[0] - z[1], float(t[0])))
        return torch.zeros_like(z)

    steps = 10
    options = dict(spacing="karras", sigma_max=schedule.sigma_max, s_churn=40.0)  # gamma = sqrt(2) - 1, Alg. 2's cap
    gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)]
    z_T = torch.tensor([[0.9], [0.1]], dtype=F64)
    sample(name, make_denoiser(model_fn, schedule, "x0"), z_T, schedule, steps, generator=gens, **options)
    sig = levels(name, schedule, steps, spacing="karras", sigma_max=schedule.sigma_max).sigmas
    evaluations = calls if name == "euler" else calls[:1]  # Heun's: the first level, where the cap applies
    dx = (z_T[0] - z_T[1]) * math.sqrt(1 + sig[0] ** 2)  # the rows' difference in x before the first step
    for i, (dz, t) in enumerate(evaluations):
        s_hat = schedule.sigma(torch.tensor([t], dtype=F64)).item()
        torch.testing.assert_close(dz * math.sqrt(1 + s_hat**2), dx, rtol=1e-9, atol=0, msg=f"level {i}")
        assert s_hat > sig[i] or i == 0  # the churn raised every level but the capped top one
        dx = dx * sig[i + 1] / s_hat
