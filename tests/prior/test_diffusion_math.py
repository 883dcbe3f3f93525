"""Schedules, parameterisations, samplers, guidance and losses of the prior, on exact Gaussians.

For data z_0 ~ N(mu, Sigma) the ideal denoiser is known in closed form,
E[z_0 | z_t] = mu + sqrt(abar) Sigma (abar Sigma + (1 - abar) I)^{-1} (z_t - sqrt(abar) mu),
so a correct sampler driven by it must return samples with mean mu and covariance Sigma, up to
its discretisation error. Everything runs in float64 on the CPU unless a test says otherwise.
"""

from __future__ import annotations

import math

import pytest
import torch

from latentdiff.prior import solvers
from latentdiff.prior.guidance import cfg_model_fn, concat_conditioning
from latentdiff.prior.losses import diffusion_loss, min_snr_weight
from latentdiff.prior.samplers import SAMPLERS, make_denoiser, number_of_evaluations, sample, timesteps
from latentdiff.prior.schedule import NoiseSchedule
from latentdiff.prior.spacing import Spacing

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two cores are shared with other jobs; small-tensor loops are faster on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class GaussianData:
    """z_0 ~ N(mu, Sigma) in 4 dims with a non-diagonal Sigma, and its exact denoiser."""

    def __init__(self, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(4, 4, generator=g, dtype=F64)
        self.Sigma = A @ A.T / 4 + 0.05 * torch.eye(4, dtype=F64)  # eigenvalues ~0.08 .. 1.35
        self.mu = torch.tensor([0.5, -1.0, 0.3, 0.0], dtype=F64)
        self.lam, self.U = torch.linalg.eigh(self.Sigma)

    def model_fn(self, schedule: NoiseSchedule, prediction: str, calls: list | None = None):
        """A perfect network: the raw eps / x0 / v output of the exact posterior mean."""

        def f(z, t):
            assert t.shape == (z.shape[0],) and t.is_floating_point() and t.device == z.device
            if calls is not None:
                calls.append(t)
            a = schedule.abar(t).to(z.dtype)[:, None]  # (B, 1)
            mu, lam, U = (x.to(z.dtype) for x in (self.mu, self.lam, self.U))
            y = (z - a.sqrt() * mu) @ U  # eigenbasis of Sigma, where the solve is a division
            x0 = mu + (y * (a.sqrt() * lam / (a * lam + 1 - a))) @ U.T
            eps = (z - a.sqrt() * x0) / (1 - a).sqrt()
            return {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction]

        return f

    def kl(self, mean, cov) -> float:
        """KL(N(mean, cov) || N(mu, Sigma)): scale-free, ~(4 + 10)/(2N) from sampling noise alone."""
        mean, cov = mean.to(F64), cov.to(F64)
        P, d = torch.linalg.inv(self.Sigma), mean - self.mu
        return 0.5 * float(torch.trace(P @ cov) + d @ P @ d - 4 + torch.logdet(self.Sigma) - torch.logdet(cov))

    def check(self, z, kl_tol: float, mean_tol: float = 0.04) -> tuple[bool, str]:
        kl, mean_err = self.kl(z.mean(0), torch.cov(z.T)), float((z.mean(0) - self.mu).abs().max())
        return kl < kl_tol and mean_err < mean_tol, f"KL {kl:.3g} (tol {kl_tol}), mean error {mean_err:.3g}"


DATA = GaussianData()
N = 20_000
# Tolerances from the discretisation error measured at 50 steps, as KL to the data:
# first-order samplers 0.02-0.08, second-order < 0.016; sampling noise ~1e-3; broken samplers >= 0.4.
KL_TOL = {1: 0.12, 2: 0.03}
ORDER = {"ddpm": 1, "ddim": 1, "euler": 1, "dpmpp-2m": 2, "heun": 2, "euler-a": 1, "dpmpp-2m-sde": 1, "unipc": 2}
SAMPLER_CASES = [
    ("ddpm", {}),
    ("ddim", {}),
    ("ddim", {"eta": 1.0}),
    ("dpmpp-2m", {}),
    ("euler", {}),
    ("heun", {}),
    ("euler-a", {}),
    ("dpmpp-2m-sde", {}),
    ("unipc", {}),
    ("heun", {"s_churn": 10.0}),
]


def _z_T(n: int = N, dtype=F64, seed: int = 2):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _run(name, schedule, prediction, steps=50, dtype=F64, data=DATA, sampler_schedule=None, **kw):
    den = make_denoiser(data.model_fn(schedule, prediction), schedule, prediction)
    return sample(
        name,
        den,
        _z_T(dtype=dtype),
        sampler_schedule or schedule,
        steps,
        generator=torch.Generator().manual_seed(3),
        **kw,
    )


# ---- samplers recover Gaussian data ----------------------------------------------------------

MC_CASES = [(("linear", False), "eps", *c) for c in SAMPLER_CASES]
MC_CASES += [(("cosine", False), "eps", *c) for c in SAMPLER_CASES]
MC_CASES += [(("scaled_linear", True), "v", *c) for c in SAMPLER_CASES]  # zero terminal SNR
MC_CASES += [(("cosine", True), "x0", *c) for c in SAMPLER_CASES if c[0] in ("ddpm", "dpmpp-2m", "unipc")]


@pytest.mark.parametrize(
    "sched, prediction, name, kw",
    MC_CASES,
    ids=[f"{s[0]}{'-ztsnr' if s[1] else ''}-{p}-{n}{''.join(map(str, kw.values()))}" for s, p, n, kw in MC_CASES],
)
def test_sampler_recovers_gaussian_mean_and_covariance(sched, prediction, name, kw):
    schedule = NoiseSchedule.make(sched[0], zero_terminal_snr=sched[1])
    z = _run(name, schedule, prediction, **kw)
    ok, msg = DATA.check(z, KL_TOL[ORDER[name]])
    assert ok, msg


@pytest.mark.parametrize("name", ["ddim", "heun"])
def test_sampler_keeps_float32_and_recovers(name):
    schedule = NoiseSchedule.make("cosine")  # abar_T ~ 2e-9: the hardest eps -> x0 division
    z = _run(name, schedule, "eps", dtype=torch.float32)
    assert z.dtype == torch.float32
    ok, msg = DATA.check(z, KL_TOL[ORDER[name]])
    assert ok, msg


def test_broken_samplers_fail_the_same_check(monkeypatch):
    """The tolerances above are tight enough to catch a dropped noise term or a wrong schedule."""
    linear, cosine = NoiseSchedule.make("linear"), NoiseSchedule.make("cosine")
    # Denoiser of one schedule driven by a sampler on another.
    for name in ("ddim", "dpmpp-2m", "heun"):
        ok, msg = DATA.check(_run(name, cosine, "eps", sampler_schedule=linear), KL_TOL[ORDER[name]])
        assert not ok, f"{name} with a mismatched schedule passed: {msg}"
    # Ancestral sampling without its noise.
    monkeypatch.setattr(solvers, "noise", lambda z, generator: torch.zeros_like(z))
    ok, msg = DATA.check(_run("ddpm", linear, "eps"), KL_TOL[1])
    assert not ok, f"ddpm without noise passed: {msg}"


def _exact_output_kl(name, schedule, steps, **kw):
    """KL to the data of a deterministic sampler's exact output law, without sampling noise.

    With the exact denoiser the sampler is an affine map z_0 = M z_T + b, read off from 5 inputs,
    and z_T's exact law is N(sqrt(abar_T) mu, abar_T Sigma + (1 - abar_T) I); what remains is the
    sampler's discretisation error alone.
    """
    basis = torch.cat([torch.zeros(1, 4, dtype=F64), torch.eye(4, dtype=F64)])
    out = sample(name, make_denoiser(DATA.model_fn(schedule, "eps"), schedule, "eps"), basis, schedule, steps, **kw)
    b, M = out[0], (out[1:] - out[0]).T
    aT = schedule.alphas_cumprod[-1].item()
    m_T, C_T = aT**0.5 * DATA.mu, aT * DATA.Sigma + (1 - aT) * torch.eye(4, dtype=F64)
    return DATA.kl(M @ m_T + b, M @ C_T @ M.T)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp-2m", "heun", "unipc"])
def test_deterministic_samplers_converge_at_their_order(kind, name):
    """KL ~ error^2 ~ steps^(-2p): halving the step shrinks it ~4x (1st order), ~16x (2nd), ~64x (3rd)."""
    schedule = NoiseSchedule.make(kind)
    # Samplers start at the schedule's own sigma(T-1) here, where z_T's law is exact: the default cap
    # at sigma = 80 (Karras spacing) or the step from T-1 to it (log-SNR) adds an error that does not
    # shrink with the steps.
    # The multistep solvers run on log-SNR steps here: trailing's last level, sigma ~ (T/N)^(1/2), makes
    # the last step's error shrink like N^(-3/2) only, whatever the solver's order.
    multistep = name in ("dpmpp-2m", "unipc")
    kw = {"sigma_max": schedule.sigma_max_finite} if name != "ddim" else {}
    kw.update({"spacing": "logsnr"} if multistep else {})
    kls = [_exact_output_kl(name, schedule, n, **kw) for n in (25, 50, 100)]
    if SAMPLERS[name].order == 3:  # UniPC: its error changes sign, so per-doubling ratios jump around
        assert kls[0] / kls[2] > 256 and kls[2] < 1e-8, kls
        return
    min_ratio = 3.0 if SAMPLERS[name].order == 1 else 10.0
    assert all(a / b > min_ratio for a, b in zip(kls, kls[1:])), kls
    assert kls[-1] < 0.025, kls


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_karras_samplers_start_at_sigma_80_at_most(kind):
    """The cap costs little: abar at sigma 80 is 1.6e-4, so the output law stays close to the data."""
    schedule = NoiseSchedule.make(kind)
    sigmas = Spacing("karras").levels(schedule, 10).sigmas
    assert sigmas[0] == pytest.approx(min(80.0, schedule.sigma_max_finite)) and sigmas[-1] == 0.0
    assert _exact_output_kl("heun", schedule, 50) < 1e-3


def test_ddpm_equals_ddim_with_eta_1():
    schedule = NoiseSchedule.make("linear")
    den = make_denoiser(DATA.model_fn(schedule, "eps"), schedule, "eps")
    runs = [
        sample(name, den, _z_T(64), schedule, 20, generator=torch.Generator().manual_seed(5), **kw)
        for name, kw in (("ddpm", {}), ("ddim", {"eta": 1.0}))
    ]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_seed_determinism_callback_and_evaluation_count(name):
    schedule = NoiseSchedule.make("linear")
    calls, seen = [], []
    den = make_denoiser(DATA.model_fn(schedule, "eps", calls), schedule, "eps")

    def run(seed):
        return sample(
            name,
            den,
            _z_T(32),
            schedule,
            7,
            generator=torch.Generator().manual_seed(seed),
            callback=lambda i, total, z, x0: seen.append((i, total, z.shape, x0.shape)),
        )

    a = run(0)
    assert len(calls) == number_of_evaluations(name, 7)
    assert seen == [(i, 7, (32, 4), (32, 4)) for i in range(7)]
    assert torch.equal(a, run(0))
    if SAMPLERS[name].order == 0:  # stochastic: a different seed gives different samples
        assert not torch.allclose(a, run(1))


def test_sampler_errors_name_the_fix():
    schedule = NoiseSchedule.make("linear", T=100)
    den = make_denoiser(DATA.model_fn(schedule, "eps"), schedule, "eps")
    with pytest.raises(ValueError, match="known samplers: ddpm, ddim, dpmpp-2m, euler, heun"):
        sample("plms", den, _z_T(2), schedule, 10)
    for steps in (0, 101):
        with pytest.raises(ValueError, match=r"steps must be an integer in 1\.\.100"):
            sample("ddim", den, _z_T(2), schedule, steps)
    with pytest.raises(ValueError, match="spacing"):
        sample("ddim", den, _z_T(2), schedule, 10, spacing="uniform")
    with pytest.raises(ValueError, match="prediction 'v' or 'x0'"):
        make_denoiser(DATA.model_fn(schedule, "eps"), NoiseSchedule.make("linear", zero_terminal_snr=True), "eps")
    assert number_of_evaluations("heun", 10) == 19 and number_of_evaluations("ddim", 10) == 10


def test_timestep_spacings():
    for spacing in ("trailing", "leading", "linspace"):
        for steps in (1, 3, 50, 1000):
            ts = timesteps(1000, steps, spacing)
            assert len(set(ts)) == steps and ts == sorted(ts, reverse=True) and 0 <= ts[-1] and ts[0] <= 999
    assert timesteps(1000, 50, "trailing")[0] == 999 and timesteps(1000, 50, "trailing")[-1] == 19
    assert timesteps(1000, 50, "leading")[:2] == [980, 960] and timesteps(1000, 50, "linspace")[-1] == 0
    assert timesteps(1000, 1000) == list(range(999, -1, -1))


def test_clip_x0_bounds_x0_and_keeps_the_pair_consistent():
    schedule = NoiseSchedule.make("cosine")
    wild = lambda z, t: 3 * z + 1  # an eps prediction far off: x0 = (z - s eps)/a explodes near T
    den = make_denoiser(wild, schedule, "eps", clip_x0=1.0)
    z, t = _z_T(256), torch.full((256,), 999.0, dtype=F64)
    x0, eps = den(z, t)
    assert x0.abs().max() <= 1.0 and make_denoiser(wild, schedule, "eps")(z, t)[0].abs().max() > 100
    torch.testing.assert_close(schedule.q_sample(x0, t, eps), z)
    seen = []
    sample("ddim", den, z, schedule, 10, callback=lambda i, n, z_t, x0_hat: seen.append(x0_hat.abs().max()))
    assert max(seen) <= 1.0


# ---- schedule ----------------------------------------------------------------------------------


def test_schedules_match_their_papers():
    lin, sd, cos = (NoiseSchedule.make(k) for k in ("linear", "scaled_linear", "cosine"))
    torch.testing.assert_close(lin.betas[[0, -1]], torch.tensor([1e-4, 0.02], dtype=F64))
    torch.testing.assert_close(sd.betas[[0, -1]], torch.tensor([0.00085, 0.012], dtype=F64))
    assert (sd.betas.sqrt().diff().diff().abs() < 1e-15).all()  # linear in sqrt(beta)
    f = torch.cos((torch.arange(1001, dtype=F64) / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(cos.alphas_cumprod[:-1], f[1:-1] / f[0])  # eq. 17 where beta is unclipped
    assert cos.betas.max() == 0.999 and cos.alphas_cumprod[-1] < 3e-9
    for s in (lin, sd, cos):
        assert s.betas.dtype == F64 and s.T == 1000
        torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0))
    with pytest.raises(ValueError, match="expected one of"):
        NoiseSchedule.make("sigmoid")


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_rescaling(kind):
    """Lin et al. 2024 Alg. 1: sqrt(abar) shifted and scaled, abar_T = 0, abar_1 unchanged."""
    old, new = NoiseSchedule.make(kind), NoiseSchedule.make(kind, zero_terminal_snr=True)
    assert new.alphas_cumprod[-1] == 0 and new.snr(torch.tensor([999]))[0] == 0
    torch.testing.assert_close(new.alphas_cumprod[0], old.alphas_cumprod[0])
    a, b = old.alphas_cumprod.sqrt(), new.alphas_cumprod.sqrt()
    slope = (b[0] - b[-1]) / (a[0] - a[-1])
    torch.testing.assert_close(b, slope * (a - a[-1]))
    assert ((new.betas > 0) & (new.betas <= 1)).all() and new.betas[-1] == 1
    assert new.sigma_max == math.inf and math.isfinite(new.sigma_max_finite)


@pytest.mark.parametrize("ztsnr", [False, True])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_parameterisations_round_trip(kind, ztsnr):
    s = NoiseSchedule.make(kind, zero_terminal_snr=ztsnr)
    g = torch.Generator().manual_seed(0)
    t = torch.arange(1000)
    z0, eps = torch.randn(1000, 3, 2, generator=g, dtype=F64), torch.randn(1000, 3, 2, generator=g, dtype=F64)
    z_t, v = s.q_sample(z0, t, eps), s.v_from(z0, eps, t)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    close(s.x0_from_v(z_t, v, t), z0)
    close(s.eps_from_v(z_t, v, t), eps)
    close(s.eps_from_x0(z_t, z0, t), eps)
    ok = t < 999 if ztsnr else t >= 0  # at abar = 0, z_t holds no z_0 for eps to give back
    close(s.x0_from_eps(z_t[ok], eps[ok], t[ok]), z0[ok])
    for prediction in ("eps", "x0", "v"):
        keep = ok if prediction == "eps" else t >= 0
        x0_hat, eps_hat = s.to_x0_eps(s.target(prediction, z0, eps, t), z_t, t, prediction)
        close(x0_hat[keep], z0[keep])
        close(eps_hat, eps)
    # float32 in, float32 out; float t equal to an integer is that integer's abar
    assert s.q_sample(z0.float(), t, eps.float()).dtype == torch.float32
    assert torch.equal(s.abar(t.to(F64)), s.abar(t)) and torch.equal(s.abar(t.float())[:999], s.abar(t)[:999])


@pytest.mark.parametrize("ztsnr", [False, True])
def test_sigma_and_t_from_sigma_invert_each_other(ztsnr):
    s = NoiseSchedule.make("cosine", zero_terminal_snr=ztsnr)
    t = torch.tensor([0.0, 0.25, 10.5, 500.75, 998.0, 998.9, 999.0], dtype=F64)
    torch.testing.assert_close(s.t_from_sigma(s.sigma(t)), t, rtol=0, atol=1e-7)
    torch.testing.assert_close(s.sigma(t) ** 2, (1 - s.abar(t)) / s.abar(t))
    dense = torch.linspace(0, 999, 5000, dtype=F64)
    assert (s.abar(dense).diff() < 0).all()  # interpolation stays monotone
    assert s.sigma_min == pytest.approx(float(s.sigma(torch.tensor([0]))[0]))


@pytest.mark.parametrize("kind", ["scaled_linear", "cosine"])
def test_t_from_sigma_refuses_a_noise_level_no_timestep_has(kind):
    """Clamping would hand the network a t whose sigma differs from its input's (Karras churn did, above sigma(T-1))."""
    s = NoiseSchedule.make(kind)
    for bad in (s.sigma_max * 1.2, s.sigma_min / 2, math.inf, math.nan):
        with pytest.raises(ValueError, match=r"outside the schedule's range .*no timestep has that noise level"):
            s.t_from_sigma(torch.tensor([1.0, bad], dtype=F64))
    ends = torch.tensor([s.sigma_min, s.sigma_max], dtype=F64)
    torch.testing.assert_close(s.t_from_sigma(ends), torch.tensor([0.0, 999.0], dtype=F64), rtol=0, atol=1e-7)
    z = NoiseSchedule.make(kind, zero_terminal_snr=True)  # sigma(T-1) = inf there: every sigma has its t
    assert z.t_from_sigma(torch.tensor([math.inf], dtype=F64)).item() == 999.0


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_q_sample_matches_iterated_forward_process(kind):
    """q(z_t | z_0) in closed form (eq. 4) = iterating q(z_t | z_{t-1}) = N(sqrt(1 - beta_t) z_{t-1}, beta_t I)."""
    s, n = NoiseSchedule.make(kind), 20_000
    g = torch.Generator().manual_seed(0)
    z0 = torch.tensor([1.5, -0.7], dtype=F64)
    z = z0.expand(n, 2).clone()
    for t in range(1000):
        z = (1 - s.betas[t]).sqrt() * z + s.betas[t].sqrt() * torch.randn(n, 2, generator=g, dtype=F64)
        if t in (0, 50, 400, 999):
            tt = torch.full((1,), t)
            mean = s.q_sample(z0[None], tt, torch.zeros(1, 2, dtype=F64))[0]
            std = s.q_sample(torch.zeros(1, 2, dtype=F64), tt, torch.ones(1, 2, dtype=F64))[0]
            torch.testing.assert_close(z.mean(0), mean, rtol=0, atol=4 * std.max().item() / n**0.5)
            torch.testing.assert_close(z.std(0) / std, torch.ones(2, dtype=F64), rtol=0, atol=0.03)


def test_posterior_is_gaussian_conditioning():
    """(mu_tilde, beta_tilde) of eq. 7 = conditioning the joint Gaussian of (z_{t-1}, z_t) given z_0."""
    s = NoiseSchedule.make("cosine")
    t = torch.arange(1, 1000)
    abar_prev, beta = s.alphas_cumprod[t - 1], s.betas[t]
    # joint given z_0 (scalar z_0 = 1.3, z_t = -0.4): Var z_{t-1} = P, Cov = sqrt(alpha) P, Var z_t = alpha P + beta
    P = 1 - abar_prev
    cov_ab, var_b = (1 - beta).sqrt() * P, (1 - beta) * P + beta
    z0, z_t = torch.full((999, 1), 1.3, dtype=F64), torch.full((999, 1), -0.4, dtype=F64)
    m_prev, m_t = abar_prev.sqrt() * 1.3, (1 - beta).sqrt() * abar_prev.sqrt() * 1.3
    mu, var = s.posterior(z0, z_t, t)
    torch.testing.assert_close(mu[:, 0], m_prev + cov_ab / var_b * (-0.4 - m_t))
    torch.testing.assert_close(var[:, 0], P - cov_ab**2 / var_b)
    mu0, var0 = s.posterior(z0[:1], z_t[:1], torch.tensor([0]))
    assert var0.item() == 0 and torch.allclose(mu0, z0[:1])  # z_{-1} is the data
    # with x0 from an eps prediction the mean is DDPM eq. 11
    eps = torch.randn(999, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    mu_eps, _ = s.posterior(s.x0_from_eps(z_t, eps, t), z_t, t)
    alpha, abar = (1 - beta)[:, None], s.alphas_cumprod[t][:, None]
    torch.testing.assert_close(mu_eps, (z_t - beta[:, None] / (1 - abar).sqrt() * eps) / alpha.sqrt())


# ---- losses -------------------------------------------------------------------------------------


def test_min_snr_weights():
    s = NoiseSchedule.make("linear", zero_terminal_snr=True)
    t = torch.tensor([0, 100, 300, 600, 999])
    abar = s.alphas_cumprod[t]
    snr = abar / (1 - abar)
    assert snr[1] > 5 > snr[2]  # covers both sides of gamma
    g = lambda p: min_snr_weight(t, s, 5.0, p)
    torch.testing.assert_close(g("x0"), snr.clamp(max=5))
    torch.testing.assert_close(g("v"), snr.clamp(max=5) / (snr + 1))
    torch.testing.assert_close(g("eps")[:4], snr.clamp(max=5)[:4] / snr[:4])
    assert g("eps")[4] == 1 and g("eps").shape == (5,)  # SNR = 0: the limit, not 0/0


def test_min_snr_floor_trains_the_level_sampling_starts_at():
    """Plain min-SNR gives v (and x0) a weight <= SNR: 0 at a zero terminal SNR's t = T-1, where sampling starts.

    The floor raises the SNR inside the min, clamp(SNR, floor, gamma), so those steps keep a weight; where
    SNR >= floor nothing changes.
    """
    s = NoiseSchedule.make("cosine", zero_terminal_snr=True)
    t = torch.arange(1000)
    snr = s.snr(t)
    plain = min_snr_weight(t, s, 5.0, "v")
    assert plain[999] == 0 and plain[900:].max() < 0.03  # the fault: the top 10% of t barely trained
    for floor in (0.1, 1.0):
        w = min_snr_weight(t, s, 5.0, "v", floor=floor)
        torch.testing.assert_close(w, snr.clamp(floor, 5.0) / (snr + 1))
        assert w[999] == floor and (w[900:] >= floor / (1 + floor)).all()
        torch.testing.assert_close(w[snr >= floor], plain[snr >= floor], rtol=0, atol=0)
        torch.testing.assert_close(min_snr_weight(t, s, 5.0, "x0", floor=floor), snr.clamp(floor, 5.0))
    with pytest.raises(ValueError, match="floor applies to the v and x0 predictions"):
        min_snr_weight(t, s, 5.0, "eps", floor=0.5)  # eps's min-SNR weight is already 1 where SNR < gamma
    with pytest.raises(ValueError, match=r"floor must be in \[0, gamma\)"):
        min_snr_weight(t, s, 5.0, "v", floor=5.0)


def test_min_snr_floor_is_a_config_field_refused_where_it_means_nothing():
    from latentdiff.core.config import ConfigError
    from latentdiff.prior.config import DiffusionConfig

    cfg = DiffusionConfig(prediction="v", zero_terminal_snr=True, loss_weighting="min_snr", min_snr_floor=1.0)
    assert cfg.min_snr_floor == 1.0 and DiffusionConfig().min_snr_floor == 0.0  # off unless set
    for bad, message in (
        (dict(prediction="eps", loss_weighting="min_snr", min_snr_floor=0.5), "applies to prediction v or x0"),
        (dict(prediction="v", loss_weighting="uniform", min_snr_floor=0.5), 'needs loss_weighting = "min_snr"'),
        (dict(prediction="v", loss_weighting="min_snr", min_snr_gamma=2.0, min_snr_floor=2.0), "below min_snr_gamma"),
    ):
        with pytest.raises(ConfigError, match=message):
            DiffusionConfig(**bad)


def test_loss_is_per_sample_and_min_snr_agrees_across_parameterisations():
    """min-SNR weights all three targets to the same loss in x0 space (Hang et al. 2023, §3.4)."""
    s = NoiseSchedule.make("cosine")
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([5, 80, 300, 700, 990])
    z0, eps = torch.randn(5, 4, 3, 3, generator=g, dtype=F64), torch.randn(5, 4, 3, 3, generator=g, dtype=F64)
    z_t = s.q_sample(z0, t, eps)
    x0_hat = z0 + 0.1 * torch.randn(5, 4, 3, 3, generator=g, dtype=F64)
    eps_hat = s.eps_from_x0(z_t, x0_hat, t)
    out = {"x0": x0_hat, "eps": eps_hat, "v": s.v_from(x0_hat, eps_hat, t)}
    losses = {p: diffusion_loss(out[p], s.target(p, z0, eps, t), t, s, "min_snr", 5.0, p) for p in out}
    for p in ("eps", "v"):
        torch.testing.assert_close(losses[p], losses["x0"])
    uniform = diffusion_loss(out["eps"], eps, t, s)
    assert uniform.shape == (5,)
    torch.testing.assert_close(uniform, ((eps_hat - eps) ** 2).flatten(1).mean(1))
    assert diffusion_loss(out["eps"].bfloat16(), eps.bfloat16(), t, s).dtype == torch.float32
    with pytest.raises(ValueError, match="weighting"):
        diffusion_loss(out["eps"], eps, t, s, "p2")


# ---- guidance -----------------------------------------------------------------------------------


def _toy_model(calls):
    def model(z, t, c):  # linear in the conditioning
        calls.append(z.shape[0])
        text, extra = c
        return z * text["scale"][:, None] + extra + t[:, None] / 1000

    return model


def _cond(B, seed):
    g = torch.Generator().manual_seed(seed)
    return ({"scale": torch.randn(B, generator=g, dtype=F64)}, torch.randn(B, 4, generator=g, dtype=F64))


def test_guidance_scale_one_is_the_conditional_model_in_one_pass():
    calls = []
    model, cond, uncond = _toy_model(calls), _cond(8, 0), _cond(8, 1)
    z, t = _z_T(8), torch.full((8,), 500.0, dtype=F64)
    out = cfg_model_fn(model, cond, uncond, 1.0)(z, t)
    assert calls == [8] and torch.equal(out, model(z, t, cond))
    calls.clear()
    assert torch.equal(cfg_model_fn(model, cond, uncond, 0)(z, t), model(z, t, uncond)) and calls == [8, 8]


def test_guidance_combines_one_batched_pass():
    calls = []
    model, cond, negative = _toy_model(calls), _cond(8, 0), _cond(8, 2)  # a negative prompt is just `uncond`
    z, t = _z_T(8), torch.full((8,), 500.0, dtype=F64)
    out = cfg_model_fn(model, cond, negative, 4.5)(z, t)
    assert calls == [16]
    c, u = model(z, t, cond), model(z, t, negative)
    torch.testing.assert_close(out, u + 4.5 * (c - u))


def test_concat_conditioning():
    a = {"tokens": torch.zeros(2, 5, 3), "mask": None, "pair": (torch.zeros(2), [torch.zeros(2, 1)])}
    b = {"tokens": torch.ones(3, 5, 3), "mask": None, "pair": (torch.ones(3), [torch.ones(3, 1)])}
    c = concat_conditioning(a, b)
    assert c["tokens"].shape == (5, 5, 3) and c["mask"] is None and c["tokens"][2:].eq(1).all()
    assert isinstance(c["pair"], tuple) and isinstance(c["pair"][1], list) and c["pair"][1][0].shape == (5, 1)
    with pytest.raises(ValueError, match="keys differ"):
        concat_conditioning({"a": torch.zeros(1)}, {"b": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"\['tokens'\]"):
        concat_conditioning({"tokens": torch.zeros(1, 4)}, {"tokens": torch.zeros(1, 5)})
    with pytest.raises(TypeError, match="cannot batch"):
        concat_conditioning(torch.zeros(1), None)
