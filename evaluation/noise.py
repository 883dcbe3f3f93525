"""How far an evaluation figure moves by chance, and the notes that say when a figure is within that noise.

On a folder of a few hundred images the figures mislead without this: FID from a hundred images
lies far above its many-image value and moves by whole units between draws; a generated set can
score below the real-vs-real floor, because the floor is measured on at most half the real set
and FID is biased upward at smaller sizes; KID is unbiased, so a model as good as the data scores
below 0 about half the time.

- FID: B bootstrap replicates (Efron 1979). Each draws, with replacement, the real reference, the
  generated set and the held-out real set, and computes FID(generated*, reference*) and the floor
  FID(held-out*, reference*). Their standard deviations are the figures' standard errors; the
  intervals are figure +- z * se (normal bootstrap intervals; z = 1.96 for 95%; cut at 0, as FID
  is never negative). Resampling repeats images, so the spread is about the true one when the sets
  differ and larger (up to 2-3x with fewer images than feature dimensions) when they are alike:
  the intervals are conservative, and so is "indistinguishable" (measured, and checked by
  tests/evaluation/test_noise_and_sizes.py). Each replicate
  also compares h generated images with the h held-out real images against the SAME reference
  draw: the mean and spread of FID(h generated*) - FID(h held-out*) are the excess of the model
  over real-vs-real noise at equal size. When its interval holds 0, the generated set is
  indistinguishable from real at this sample size.
- KID: torch-fidelity's mean and std over 100 random subsets (fid.kernel_distance), with subsets
  of at most half the smaller set: subsets as large as the set are all the whole set, and their
  spread is 0. With half-size subsets the spread is the delete-d jackknife's standard error of
  the figure (Shao and Wu 1989; smaller subsets overstate it). A KID within NOISE_STDS of 0 is
  indistinguishable from real.
- CLIP score: the mean over images, with the interval mean +- z * sd / sqrt(N).

The replicates' FID is computed here in closed form (frechet_from_features), with the trace term
Tr((Sigma_1 Sigma_2)^(1/2)) as a sum of singular values or eigenvalues, not scipy's sqrtm: the
same figure (a test checks it against torch-fidelity's) at a fraction of the cost, so that
B = 50 replicates cost seconds, not minutes, in a 2048-dimensional Inception space.
"""

from __future__ import annotations

import math

import numpy as np

FID_BOOTSTRAPS = 50  # replicates per FID; --bootstrap sets it, 0 skips the intervals
CONFIDENCE = 0.95
Z = 1.959964  # two-sided 95% normal quantile
NOISE_STDS = 2.0  # a KID within this many of its standard errors of 0 is within noise
SAME = "indistinguishable from real at this sample size"


def fig(x: float) -> str:
    """An evaluation figure as printed: two decimals, or two significant digits under 0.1.

    FID and KID in a feature space whose features hardly vary (a barely trained classifier's) are
    tiny; printed with two decimals they would read 0.00, "the same as real".
    """
    if x == 0 or abs(x) >= 0.1:
        return f"{x:.2f}"
    return f"{x:.{min(8, 1 - math.floor(math.log10(abs(x))))}f}"  # 0.0023, 0.000071: fixed point, not 7.1e-05


class _Reference:
    """One reference draw: its mean, centred and scaled features (Sigma = C^T C), and, when needed, Sigma^(1/2)."""

    def __init__(self, x: np.ndarray):
        self.mu, self.c = _centred(x)
        self.trace = float((self.c * self.c).sum())
        self._root: np.ndarray | None = None

    @property
    def root(self) -> np.ndarray:
        """Sigma^(1/2) (D, D), symmetric, from one eigendecomposition."""
        if self._root is None:
            w, u = np.linalg.eigh(self.c.T @ self.c)
            self._root = (u * np.sqrt(np.clip(w, 0, None))) @ u.T
        return self._root


def _centred(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), C (N, D)) with C^T C the unbiased covariance of the rows of x (N >= 2)."""
    mu = x.mean(0)
    return mu, (x - mu) / np.sqrt(x.shape[0] - 1)


def _fid_to(x: np.ndarray, ref: _Reference) -> float:
    """FID (Heusel et al. 2017, eq. 6) of the rows of x to a reference draw.

    Tr((Sigma_x Sigma_r)^(1/2)) with Sigma = C^T C: the eigenvalues of C_x^T C_x C_r^T C_r are the
    squared singular values of C_x C_r^T (N_x, N_r), and those of Sigma_r^(1/2) Sigma_x Sigma_r^(1/2)
    (D, D); whichever matrix is smaller is decomposed.
    """
    mu, c = _centred(x)
    n, d = c.shape[0], c.shape[1]
    if min(n, ref.c.shape[0]) < d:
        cross = np.linalg.svd(c @ ref.c.T, compute_uv=False).sum()
    else:
        inner = ref.root @ (c.T @ c) @ ref.root
        cross = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    return float(((mu - ref.mu) ** 2).sum() + (c * c).sum() + ref.trace - 2 * cross)


def frechet_from_features(x: np.ndarray, y: np.ndarray) -> float:
    """FID between the rows of x (N1, D) and y (N2, D), float64; equals fid.frechet_distance on the same sets."""
    return _fid_to(np.asarray(x, np.float64), _Reference(np.asarray(y, np.float64)))


def interval(value: float, sd: float, lowest: float | None = None) -> list[float]:
    """[value - z sd, value + z sd]: the normal 95% interval, its lower end raised to `lowest` (FID >= 0) if given."""
    lo = value - Z * sd
    return [lo if lowest is None else max(lo, lowest), value + Z * sd]


RESAMPLE_REFERENCE_FLOPS = 2e9  # per replicate; above it the reference is held fixed (see fid_bootstrap)
BOOTSTRAP_FLOPS = 1e11  # all replicates together: past it fewer are drawn, never under MIN_BOOTSTRAPS
MIN_BOOTSTRAPS = 10


def _replicate_flops(sizes: tuple[int, ...], n_r: int, d: int) -> float:
    """Rough floating-point operations of one replicate that resamples the reference too (_fid_to's routes)."""
    total, d_route = 0.0, False
    for n in sizes:
        if min(n, n_r) < d:
            total += n * n_r * d + 4 * min(n, n_r) ** 2 * max(n, n_r)
        else:
            total += n * d * d + 12 * d**3
            d_route = True
    return total + (n_r * d * d + 10 * d**3 if d_route else 0)


def _sum_singular_values(c: np.ndarray) -> float:
    """Sum of the singular values of c (N, D), through the smaller of its two Gram matrices."""
    gram = c @ c.T if c.shape[0] < c.shape[1] else c.T @ c
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None)).sum())


class _Seen:
    """A set X against a FIXED reference: X and Z = X Sigma_r^(1/2), so that a resample's Tr((Sigma_x Sigma_r)^(1/2))
    is the sum of singular values of its centred Z, an (N, D) matrix, with no D x D decomposition per replicate."""

    def __init__(self, x: np.ndarray, ref: _Reference):
        self.x, self.z, self.ref = x, x @ ref.root, ref

    def fid(self, rows: np.ndarray) -> float:
        x, z = self.x[rows], self.z[rows]
        scale = 1 / np.sqrt(len(rows) - 1)
        mu, zc = x.mean(0), (z - z.mean(0)) * scale
        trace = float((((x - mu) * scale) ** 2).sum())
        return float(((mu - self.ref.mu) ** 2).sum() + trace + self.ref.trace - 2 * _sum_singular_values(zc))


def fid_bootstrap(
    fake: np.ndarray, holdout: np.ndarray, reference: np.ndarray, replicates: int = FID_BOOTSTRAPS, seed: int = 0
) -> dict[str, float | int | bool]:
    """Standard errors of FID and of the floor, and the equal-size excess of generated over held-out real.

    fake (N_f, D), holdout (h, D), reference (N_r, D): features. Returns fid_sd, floor_sd, excess
    (the replicates' mean of FID(h generated*) - FID(h held-out*), the same reference draw in both),
    excess_sd, n_excess = h, resampled_reference and replicates (the number drawn). The reference
    is resampled too while a replicate costs at most RESAMPLE_REFERENCE_FLOPS; above that (a large
    reference in a wide space, e.g. 9000 images of 2048-d Inception features: a minute a
    replicate) it is held fixed, which leaves its noise out of the intervals (the smaller part, as
    it is the larger set), resampled_reference is False, and the replicates are cut to fit
    BOOTSTRAP_FLOPS (at least MIN_BOOTSTRAPS). Seeded: the same sets give the same figures.
    """
    if replicates < 2:
        raise ValueError(f"a bootstrap needs at least 2 replicates, got {replicates}")
    fake, holdout, reference = (np.asarray(a, np.float64) for a in (fake, holdout, reference))
    rng = np.random.default_rng(seed)
    n_f, h, n_r, d = fake.shape[0], holdout.shape[0], reference.shape[0], reference.shape[1]
    sizes = (n_f, h) if h == n_f else (n_f, h, h)
    cost = _replicate_flops(sizes, n_r, d)
    resample = cost <= RESAMPLE_REFERENCE_FLOPS
    if not resample:
        cost = sum(n * min(n, d) * max(n, d) + 4 * min(n, d) ** 3 for n in sizes)
        replicates = max(min(replicates, int(BOOTSTRAP_FLOPS // cost)), MIN_BOOTSTRAPS)
        fixed = _Reference(reference)
        seen_fake, seen_holdout = _Seen(fake, fixed), _Seen(holdout, fixed)
    fids, floors, excess = [], [], []
    for _ in range(replicates):
        rows_f, rows_h = rng.integers(0, n_f, n_f), rng.integers(0, h, h)
        if resample:
            ref = _Reference(reference[rng.integers(0, n_r, n_r)])
            f = fake[rows_f]
            fids.append(_fid_to(f, ref))
            floors.append(_fid_to(holdout[rows_h], ref))
            # At the floor's size: the first h of the resampled generated set are h draws with replacement too.
            matched = fids[-1] if h == n_f else _fid_to(f[:h], ref)
        else:
            fids.append(seen_fake.fid(rows_f))
            floors.append(seen_holdout.fid(rows_h))
            matched = fids[-1] if h == n_f else seen_fake.fid(rows_f[:h])
        excess.append(matched - floors[-1])
    return {
        "fid_sd": float(np.std(fids, ddof=1)),
        "floor_sd": float(np.std(floors, ddof=1)),
        "excess": float(np.mean(excess)),
        "excess_sd": float(np.std(excess, ddof=1)),
        "n_excess": h,
        "resampled_reference": resample,
        "replicates": replicates,
    }


def kid_note(kid: float, kid_std: float) -> str | None:
    """A sentence when KID is within NOISE_STDS standard errors of 0 (the value for real vs real), else None."""
    if kid_std <= 0 or kid >= NOISE_STDS * kid_std:
        return None
    figure = f"KID x1e3 {fig(kid * 1e3)} +- {fig(kid_std * 1e3)}"
    if kid < 0:
        return (
            f"{figure} is below 0 by chance: KID is unbiased, so sets as close as real to real score below 0 "
            f"about half the time; {SAME}"
        )
    return f"{figure} is within {NOISE_STDS:g} standard errors of 0, the value for real vs real: {SAME}"


def fid_notes(result: dict) -> list[str]:
    """Sentences that explain a FID result of fid.score: within real noise, a floor from fewer images, few images."""
    notes = []
    fid, floor, h, n_fake = result["fid"], result["fid_floor"], result["n_floor"], result["n_fake"]
    lo_hi = result.get("fid_excess_interval")
    within = lo_hi is not None and lo_hi[0] <= 0
    if fid <= floor or within:
        head = (
            f"FID {fig(fid)} is below the real-vs-real floor {fig(floor)}"
            if fid <= floor
            else f"FID {fig(fid)} is within the noise of the real-vs-real floor {fig(floor)}"
        )
        if lo_hi is not None:
            head += (
                f" (at equal size, {h} generated vs {h} held-out real against one reference, generated minus "
                f"real is {fig(result['fid_excess'])}, 95% [{fig(lo_hi[0])}, {fig(lo_hi[1])}], which holds 0)"
            )
        notes.append(f"{head}: {SAME}")
    if h < n_fake:
        notes.append(
            f"the floor comes from {h} held-out real images, fewer than the {n_fake} generated (the real set "
            f"has {h + result['n_reference']}); FID is higher at smaller sizes, so the floor sits above a "
            f"same-size one: compare at equal size (the excess), not with the floor itself"
        )
    if result.get("bootstrap_reference") is False:
        notes.append(
            f"the {result['n_reference']} reference images were held fixed in the bootstrap, to keep it fast in "
            f"{result.get('feature_dims')} dimensions: the intervals leave out the reference's own noise"
        )
    dims = result.get("feature_dims")
    if dims and result["n_reference"] < dims:
        notes.append(
            f"the reference holds {result['n_reference']} real images in a {dims}-dimensional feature space: "
            "its covariance is rank-deficient, so FID is biased upward and noisy"
        )
    return notes


def mean_interval(values: np.ndarray) -> tuple[float, list[float] | None]:
    """(mean, its 95% normal interval mean +- z sd / sqrt(N); None for a single value) of per-image scores."""
    values = np.asarray(values, np.float64)
    mean = float(values.mean())
    if values.size < 2:
        return mean, None
    return mean, interval(mean, float(values.std(ddof=1)) / np.sqrt(values.size))
