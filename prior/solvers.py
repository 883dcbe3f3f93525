"""Samplers in the VP variable z_t: ancestral DDPM, DDIM, DPM-Solver++ (ODE and SDE) and UniPC.

Each walks the levels of its `Walk` (denoiser.py; placed by the spacing options, spacing.py) and
lands on the data after the last level. Step coefficients are Python floats computed from the
schedule's CPU float64 tables before the loop, so the loop never waits on the device. The
first-order jump from the last level to the data returns that level's x0_hat, a posterior mean
without the posterior variance: with few trailing steps that level is far from the data and the
jump dominates the error. The multistep ODE solvers replace it by a second-order step in sigma
(`_second_order_to_data`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .denoiser import Denoiser, Walk, noise, t_like
from .schedule import posterior_coefficients


def sample_ddpm(denoiser: Denoiser, z_T: Tensor, walk: Walk) -> Tensor:
    """Ancestral sampling, DDPM Alg. 2: z_s ~ q(z_s | z_t, x0_hat) (eq. 6-7; eq. 11 when x0_hat comes from eps).

    Between visited levels the betas are recomputed, beta' = 1 - abar_t / abar_s (Improved DDPM §4).
    """
    lv, z = walk.levels, z_T
    for i, t in enumerate(lv.ts):
        x0, _ = denoiser(z, t_like(z, t))
        walk.report(i, z, x0)
        c_x0, c_zt, var = posterior_coefficients(lv.abars[i], lv.abars[i + 1])
        z = c_x0 * x0 + c_zt * z
        if var > 0:  # 0 at the jump to the data
            z = z + math.sqrt(var) * noise(z, walk.generator)
    return z


def sample_ddim(denoiser: Denoiser, z_T: Tensor, walk: Walk, *, eta: float = 0.0) -> Tensor:
    """DDIM, Song et al. 2021 eq. 12 (sigma_t of eq. 16 scaled by eta; eta = 1 is ancestral DDPM)."""
    lv, z = walk.levels, z_T
    for i, t in enumerate(lv.ts):
        x0, eps = denoiser(z, t_like(z, t))  # x0 = "predicted x_0", eps = eps_theta(x_t, t)
        walk.report(i, z, x0)
        a_t, a_s = lv.abars[i], lv.abars[i + 1]  # alpha_t and alpha_{t-1} in the DDIM paper's notation
        sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
        # 1. predicted x_0; 2. "direction pointing to x_t"; 3. random noise.
        z = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - sigma**2, 0.0)) * eps
        if sigma > 0:
            z = z + sigma * noise(z, walk.generator)
    return z


def _second_order_to_data(x0: Tensor, eps: Tensor, eps_prev: Tensor, sigma: float, sigma_prev: float) -> Tensor:
    """The last step, from sigma to the data, with eps_hat linear in sigma through the last two levels.

    In x = z / alpha the ODE is dx/dsigma = eps_hat (Karras et al. 2022 eq. 3 with sigma(t) = t);
    integrating the line through (sigma_prev, eps_prev) and (sigma, eps) from sigma to 0 is the
    two-step Adams-Bashforth rule: x_data = x0_hat + sigma^2 / (2 (sigma_prev - sigma)) (eps_prev - eps).
    In lambda every polynomial extrapolation of x0_hat diverges at lambda = inf, hence sigma here.
    """
    if math.isinf(sigma_prev):
        return x0
    return x0 + sigma**2 / (2 * (sigma_prev - sigma)) * (eps_prev - eps)


def sample_dpmpp_2m(denoiser: Denoiser, z_T: Tensor, walk: Walk, *, final_order: int = 2) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022b Alg. 2: multistep data prediction in lambda = log(alpha/sigma).

    The first step is first order (no earlier x0_hat); the last, to the data, is second order in
    sigma (`_second_order_to_data`), or first order (x0_hat itself) with final_order = 1, as diffusers'
    DPMSolverMultistepScheduler ends (final_sigmas_type "zero"). Deterministic; the walk's generator is unused.
    """
    if final_order not in (1, 2):
        raise ValueError(f"final_order must be 1 or 2, got {final_order!r}")
    lv, z = walk.levels, z_T
    lam, sig = lv.lambdas, lv.sigmas
    x0_prev = eps_prev = None
    for i, t in enumerate(lv.ts):
        x0, eps = denoiser(z, t_like(z, t))
        walk.report(i, z, x0)
        a_t, a_s = lv.abars[i], lv.abars[i + 1]
        if a_s == 1.0:
            if eps_prev is None or final_order == 1:
                return x0
            return _second_order_to_data(x0, eps, eps_prev, sig[i], sig[i - 1])
        h = lam[i + 1] - lam[i]  # h_i = lambda_{t_i} - lambda_{t_{i-1}}
        if x0_prev is None or math.isinf(lam[i - 1]):
            D = x0  # first order (DPM-Solver++ 1 = DDIM)
        else:
            r = (lam[i] - lam[i - 1]) / h  # r_i = h_{i-1} / h_i
            D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        # x_{t_i} = (sigma_{t_i}/sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i
        z = math.sqrt((1 - a_s) / (1 - a_t)) * z - math.sqrt(a_s) * math.expm1(-h) * D
        x0_prev, eps_prev = x0, eps
    raise AssertionError("unreachable: the last level jumps to the data")


def sample_dpmpp_2m_sde(denoiser: Denoiser, z_T: Tensor, walk: Walk, *, eta: float = 1.0) -> Tensor:
    """SDE-DPM-Solver++(2M) of Lu et al. 2022b (DPM-Solver++), eta scaling the injected noise.

    One step of h in lambda, c = 1 + eta: the exact solution of the linear part of the
    data-prediction SDE with x0_hat held at x0_t, plus Alg. 2's second-order correction:
        z_s = (sigma_s/sigma_t) e^{-eta h} z_t + alpha_s (1 - e^{-c h}) [x0_t + (x0_t - x0_prev) / (2 r)]
              + sigma_s sqrt(1 - e^{-2 eta h}) n,   n ~ N(0, I), r = h_prev / h.
    eta = 0 is DPM-Solver++(2M); eta = 1 with the correction dropped is ancestral DDPM (the noise
    variance is the posterior's, sigma_s^2 (1 - e^{-2h})). Marginals are kept exactly for any eta
    (alpha and sigma coefficients add up). The last step, to the data, returns x0_hat.
    """
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    lv, z = walk.levels, z_T
    lam = lv.lambdas
    x0_prev = None
    for i, t in enumerate(lv.ts):
        x0, _ = denoiser(z, t_like(z, t))
        walk.report(i, z, x0)
        a_t, a_s = lv.abars[i], lv.abars[i + 1]
        if a_s == 1.0:
            return x0
        h = lam[i + 1] - lam[i]
        one_minus_e = -math.expm1(-(1 + eta) * h)  # 1 - e^{-(1 + eta) h}
        decay = math.exp(-eta * h) if eta > 0 else 1.0  # e^{-eta h}; 0 * inf is not 0 in floats
        z = math.sqrt((1 - a_s) / (1 - a_t)) * decay * z + math.sqrt(a_s) * one_minus_e * x0
        if x0_prev is not None and not math.isinf(lam[i - 1]):
            r = (lam[i] - lam[i - 1]) / h
            z = z + math.sqrt(a_s) * one_minus_e / (2 * r) * (x0 - x0_prev)
        if eta > 0:
            z = z + math.sqrt((1 - a_s) * -math.expm1(-2 * eta * h)) * noise(z, walk.generator)
        x0_prev = x0
    raise AssertionError("unreachable: the last level jumps to the data")


def _unipc_weights(rks: list[float], h: float, variant: str) -> tuple[float, list[float]]:
    """B(h) and the weights a solving UniPC's order condition R_p(h) a = phi_p(h) / B(h) (Zhao et al. 2023, §3).

    rks: the r_k = (lambda_{s-k} - lambda_s) / h of the points used (last 1.0 for the corrector);
    row j of R is r_k^j and phi_j = j! (e^x - sum_{k<=j} x^k / k!) / x^j with x = -h (the data
    prediction's phi functions, scaled). B(h) = e^{-h} - 1 ("bh2") or -h ("bh1").
    """
    x = -h
    B = math.expm1(x) if variant == "bh2" else x
    p = len(rks)
    phi, term, partial = [], 1.0, 1.0  # term = x^k / k!, partial = sum_{k<=j} x^k / k!
    for j in range(1, p + 1):
        term *= x / j
        partial += term
        phi.append(math.factorial(j) * (math.exp(x) - partial) / x**j)
    R = torch.tensor([[r**j for r in rks] for j in range(p)], dtype=torch.float64)
    a = torch.linalg.solve(R, torch.tensor(phi, dtype=torch.float64) / B)
    return B, a.tolist()


def sample_unipc(denoiser: Denoiser, z_T: Tensor, walk: Walk, *, order: int = 3, variant: str = "bh2") -> Tensor:
    """UniPC, Zhao et al. 2023: the UniP-p predictor and UniC corrector, multistep, on data prediction.

    At level s with the last p-1 levels s-k, h = lambda_t - lambda_s, r_k = (lambda_{s-k} - lambda_s) / h,
    D_k = (x0_{s-k} - x0_s) / r_k:
        predictor  z~_t = (sigma_t/sigma_s) z_s - alpha_t (e^{-h} - 1) x0_s - alpha_t B(h) sum_k a_k D_k
        corrector  z_t  = the same with one more point, D_p = x0~_t - x0_s (r_p = 1), where
                   x0~_t = x0_hat(z~_t) is the evaluation the next step makes anyway (no extra one).
    The corrector raises the order by one (UniC-p is order p + 1). The order ramps up over the first
    steps as earlier levels become available; the last step, to the data, is second order in sigma
    (`_second_order_to_data`) from the corrected state. Deterministic; the walk's generator is unused.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order!r}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    lv, z = walk.levels, z_T
    lam, sig = lv.lambdas, lv.sigmas
    x0s: list[Tensor] = []  # x0_hat at each level visited, evaluated at the predicted state
    z_prev = eps_prev = None  # the corrected state at the previous level and its eps_hat

    def step(z_s: Tensor, s: int, p: int, x0_new: Tensor | None) -> Tensor:
        """From level s to s + 1 with the last p points (and x0_new at s + 1 for the corrector)."""
        a_s, a_t = lv.abars[s], lv.abars[s + 1]
        h = lam[s + 1] - lam[s]
        base = math.sqrt((1 - a_t) / (1 - a_s)) * z_s - math.sqrt(a_t) * math.expm1(-h) * x0s[s]
        if math.isinf(lam[s]):  # from abar_s = 0 (h = inf): DDIM's step, the first-order base
            return base
        # A level at lambda = -inf (abar = 0: a zero-terminal-SNR walk's first) has r_k = inf and gives no slope:
        # drop that point alone, as DPM-Solver++(2M) does, and keep the order the finite ones give.
        ks = [k for k in range(1, p) if not math.isinf(lam[s - k])]
        rks = [(lam[s - k] - lam[s]) / h for k in ks] + ([1.0] if x0_new is not None else [])
        if not rks:
            return base
        Ds = [(x0s[s - k] - x0s[s]) / r for k, r in zip(ks, rks)]
        if x0_new is not None:
            Ds.append(x0_new - x0s[s])
        if x0_new is None and len(ks) == 1:  # a_1 = 1/2 (the system gives 1/2 + O(h)) makes UniP-2 DPM-Solver++(2M)
            B, a = math.expm1(-h) if variant == "bh2" else -h, [0.5]
        else:
            B, a = _unipc_weights(rks, h, variant)
        return base - math.sqrt(a_t) * B * sum(w * D for w, D in zip(a, Ds))

    for i, t in enumerate(lv.ts):
        x0, _ = denoiser(z, t_like(z, t))
        if i > 0:  # UniC: redo the step into this level with its own x0_hat, keep x0 (no new evaluation)
            z = step(z_prev, i - 1, min(order, i), x0)
        walk.report(i, z, x0)
        x0s.append(x0)
        a = lv.abars[i]
        eps = (z - math.sqrt(a) * x0) / math.sqrt(1 - a)  # eps_hat of the corrected state
        if lv.abars[i + 1] == 1.0:
            return x0 if eps_prev is None else _second_order_to_data(x0, eps, eps_prev, sig[i], sig[i - 1])
        z_prev, eps_prev = z, eps
        z = step(z, i, min(order, i + 1), None)
    raise AssertionError("unreachable: the last level jumps to the data")
