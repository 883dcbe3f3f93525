"""FID (Heusel et al. 2017, eq. 6) and KID through torch-fidelity, with cached real-image statistics.

    FID = ||mu_r - mu_g||^2 + Tr(Sigma_r + Sigma_g - 2 (Sigma_r Sigma_g)^(1/2))

the Frechet distance between Gaussian fits (mean, covariance) of features of real and generated
images. Features come from a torch-fidelity feature extractor (features.py) through
torch-fidelity's own dataset loop; the fit and the distance are torch-fidelity's
fid_features_to_statistics / fid_statistics_to_metric, fed float64 features so the result
matches a float64 scipy computation. KID is torch-fidelity's kid_features_to_metric.

FID depends on the sample count and the feature space, so every figure carries both, and a
floor: the FID between two disjoint real subsets of the same size (`real_reference`). Every
figure also carries its noise (noise.py): a bootstrap interval for FID and for the floor, the
equal-size excess of generated over real with its interval, KID's spread, and notes that say
when a figure is within that noise ("indistinguishable from real at this sample size").

Two image sets of different sizes are compared at the real set's size: the generated images are
resized to it (antialiased bilinear, images.match_size) before the feature extractor, and the
result says so; sets whose aspect ratios differ are refused (`score_images`).

FID from fewer images than feature dimensions (N < D) rests on a rank-deficient covariance and
is biased upward; it still runs, with a FewImagesWarning that says how many images to use.
KID is printed x1e3 (the convention of Binkowski et al. 2018 and later papers); the JSON
results keep the raw value.

Real statistics are cached as .npz (mu, sigma, and the features for KID), keyed by a hash of
the pixels and the extractor's weights hash: new data or a retrained extractor misses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.utils import get_featuresdict_from_dataset

from latentdiff.core.checkpoint import atomic_write

from . import noise
from .features import FeatureSpace
from .images import UInt8Images, match_size, pixel_hash
from .noise import fig

KID_SUBSETS = 100  # torch-fidelity's default
# torch-fidelity's default, lowered to half the smaller set: subsets as large as a set are all the whole
# set and their spread is 0; half-size subsets make the spread the figure's standard error (noise.py).
KID_SUBSET_SIZE = 1000
KID_SCALE = 1e3  # KID is printed x1e3, as papers report it


class FewImagesWarning(UserWarning):
    """FID from fewer images than feature dimensions: a rank-deficient covariance, biased upward."""


@dataclass(frozen=True)
class Statistics:
    """Gaussian fit of N feature vectors, and the vectors themselves (float32, for KID)."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    features: np.ndarray  # (N, D) float32

    @property
    def n(self) -> int:
        return self.features.shape[0]


def extract_features(
    space: FeatureSpace, images: torch.Tensor, batch_size: int = 100, verbose: bool = False
) -> torch.Tensor:
    """(N, D) float64 features of uint8 (or [-1, 1] float) images (N, C, H, W), via torch-fidelity's loop."""
    dataset = UInt8Images(images)
    if len(dataset) == 0:
        raise ValueError("no images to extract features from")
    on_cuda = space.device.type == "cuda"
    # save_cpu_ram=True: no worker processes; the images are already in memory.
    features = get_featuresdict_from_dataset(dataset, space.extractor, batch_size, on_cuda, True, verbose)
    return features[space.layer].double()


def statistics(features: torch.Tensor) -> Statistics:
    """torch-fidelity's Gaussian fit, in float64 (its np.mean keeps float32 input in float32)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"a Gaussian fit needs at least 2 feature vectors (N, D), got {tuple(features.shape)}")
    stats = fid_features_to_statistics(features.detach().cpu().double())
    return Statistics(
        np.asarray(stats["mu"], np.float64),
        np.atleast_2d(stats["sigma"]).astype(np.float64),
        features.detach().cpu().float().numpy(),
    )


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """FID between two Gaussian fits (torch-fidelity's fid_statistics_to_metric)."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(
            f"feature sizes differ ({a.mu.shape[0]} vs {b.mu.shape[0]}): were both sets "
            "scored with the same feature extractor?"
        )
    d, n = a.mu.shape[0], min(a.n, b.n)
    if n < d:
        warnings.warn(
            f"FID from {n} images in a {d}-dimensional feature space: with fewer images than dimensions "
            f"the covariance is rank-deficient and FID is biased upward; use at least {d} images "
            "(compare figures only at the same count)",
            FewImagesWarning,
            stacklevel=2,
        )
    return float(
        fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, verbose=False)[
            KEY_METRIC_FID
        ]
    )


def kernel_distance(a: Statistics, b: Statistics, seed: int = 0) -> tuple[float, float, int]:
    """(KID mean, std, subset size) by torch-fidelity: unbiased MMD^2, cubic polynomial kernel, 100 subsets.

    Subsets hold at most half the smaller set (at least 2), so that the std is the figure's noise.
    """
    size = min(max(2, min(a.n, b.n) // 2), KID_SUBSET_SIZE, a.n, b.n)
    # float32 features: 300 kernel matrices of 1000 x 1000 take ~8 s on 2 cores instead of ~12 s in
    # float64, and KID's subset noise (its std) is far above float32 rounding.
    out = kid_features_to_metric(
        torch.from_numpy(a.features),
        torch.from_numpy(b.features),
        kid_subsets=KID_SUBSETS,
        kid_subset_size=size,
        rng_seed=seed,
        verbose=False,
    )
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD], size


def default_cache_dir() -> Path:
    return Path(os.environ.get("LATENTDIFF_CACHE", Path.home() / ".cache" / "latentdiff")) / "fid_stats"


class StatisticsCache:
    """Statistics of image sets on disk, one .npz per (pixels, extractor weights); root=None disables it."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    def path(self, images: torch.Tensor, space: FeatureSpace) -> Path | None:
        if self.root is None:
            return None
        key = hashlib.sha256(f"{pixel_hash(images)}|{space.key}".encode()).hexdigest()[:24]
        return self.root / f"{key}.npz"

    def statistics(
        self, images: torch.Tensor, space: FeatureSpace, batch_size: int = 100, verbose: bool = False
    ) -> Statistics:
        """Statistics of `images` in `space`, from the cache when these pixels met these weights before."""
        path = self.path(images, space)
        if path is not None and path.is_file():
            with np.load(path, allow_pickle=False) as f:
                self.hits += 1
                return Statistics(f["mu"], f["sigma"], f["features"])
        stats = statistics(extract_features(space, images, batch_size, verbose))
        self.misses += 1
        if path is not None:
            info = json.dumps({"extractor": space.label, "key": space.key, "n": stats.n})

            def write(tmp: str) -> None:
                with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to the temp name
                    np.savez(f, mu=stats.mu, sigma=stats.sigma, features=stats.features, info=np.array(info))

            atomic_write(path, write)
        return stats


@dataclass(frozen=True)
class RealReference:
    """Real images split for scoring: a reference set, and a disjoint holdout that gives the floor."""

    reference: Statistics
    floor_fid: float  # FID(holdout, reference): what a perfect model of the data would score
    floor_n: int  # holdout size (= the generated count when the real set allows it)
    label: str  # the feature space
    holdout: torch.Tensor  # (floor_n,) int64 indices of the held-out real images; the others are the reference
    held_out: Statistics  # the held-out images' statistics: the bootstrap resamples their features
    size: tuple[int, int]  # (H, W) of the real images: generated images are compared at this size


def split_real(n_real: int, h: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(holdout, reference) indices: a seeded permutation of range(n_real) cut after h, each part sorted.

    A permutation, not file order: real sets stored by class or folder would otherwise hold
    whole categories out of the reference.
    """
    order = torch.randperm(n_real, generator=torch.Generator().manual_seed(seed))
    return order[:h].sort().values, order[h:].sort().values


def real_reference(
    real: torch.Tensor,
    n_fake: int,
    space: FeatureSpace,
    cache: StatisticsCache,
    batch_size: int = 100,
    verbose: bool = False,
    seed: int = 0,
) -> RealReference:
    """Split real images into a holdout of h = min(n_fake, N // 2) and the reference (split_real).

    Generated sets are compared to the reference; the holdout's FID to the same reference is
    the floor, computed at the same sample count as the generated set whenever N >= 2 n_fake.
    """
    n_real = real.shape[0]
    h = min(n_fake, n_real // 2)
    if h < 2:
        raise ValueError(
            f"{n_real} real images are too few to split into a reference and a floor holdout; give at least 4"
        )
    held, kept = split_real(n_real, h, seed)
    reference = cache.statistics(real[kept], space, batch_size, verbose)
    holdout = cache.statistics(real[held], space, batch_size, verbose)
    size = (int(real.shape[-2]), int(real.shape[-1]))
    return RealReference(reference, frechet_distance(holdout, reference), h, space.label, held, holdout, size)


def score(
    fake: Statistics, ref: RealReference, bootstraps: int = noise.FID_BOOTSTRAPS, seed: int = 0
) -> dict[str, float | int | str | list | None]:
    """FID and KID of generated statistics against the reference: counts, extractor, floor, noise and notes.

    With bootstraps >= 2: fid_sd, fid_interval and fid_floor_interval (95%), and the equal-size
    excess fid_excess with fid_excess_interval (noise.fid_bootstrap); with 0 those are None.
    "notes" holds the sentences that explain the figures (noise.fid_notes, noise.kid_note).
    """
    kid, kid_std, kid_size = kernel_distance(fake, ref.reference)
    fid = frechet_distance(fake, ref.reference)
    result: dict = {
        "fid": fid,
        "fid_floor": ref.floor_fid,
        "kid": kid,
        "kid_std": kid_std,
        "kid_subset_size": kid_size,
        "n_fake": fake.n,
        "n_reference": ref.reference.n,
        "n_floor": ref.floor_n,
        "features": ref.label,
        "feature_dims": int(fake.mu.shape[0]),
        "bootstraps": bootstraps,
        "fid_sd": None,
        "fid_interval": None,
        "fid_floor_interval": None,
        "fid_excess": None,
        "fid_excess_interval": None,
        "n_excess": ref.floor_n,
    }
    if bootstraps:
        b = noise.fid_bootstrap(fake.features, ref.held_out.features, ref.reference.features, bootstraps, seed)
        result.update(
            {
                "bootstraps": b["replicates"],
                "bootstrap_reference": b["resampled_reference"],
                "fid_sd": b["fid_sd"],
                "fid_interval": noise.interval(fid, b["fid_sd"], lowest=0.0),
                "fid_floor_interval": noise.interval(ref.floor_fid, b["floor_sd"], lowest=0.0),
                "fid_excess": b["excess"],
                "fid_excess_interval": noise.interval(b["excess"], b["excess_sd"]),
            }
        )
    kid_words = noise.kid_note(kid, kid_std)
    result["notes"] = noise.fid_notes(result) + ([kid_words] if kid_words else [])
    return result


def score_images(
    space: FeatureSpace,
    images: torch.Tensor,
    ref: RealReference,
    batch_size: int = 100,
    verbose: bool = False,
    bootstraps: int = noise.FID_BOOTSTRAPS,
    what: str = "generated",
) -> dict:
    """score() of images (N, C, H, W) compared at the real images' size: resized and said so, or refused.

    The one path from a generated (or reconstructed) image set to its figures: `compared_size` is
    the size both sets reached the extractor at, `resized` the sentence that says how the
    generated images got there (None when they already had it; also in "notes").
    """
    matched, resized = match_size(images, ref.size, what)
    result = score(statistics(extract_features(space, matched, batch_size, verbose)), ref, bootstraps)
    result["compared_size"] = list(ref.size)
    result["resized"] = resized
    if resized:
        result["notes"].insert(0, resized)
    return result


def describe(result: dict, what: str = "generated") -> str:
    """ "FID 48.10 [46.90, 49.30] (floor 8.00 [7.50, 8.50] from 1000 vs 9000 real) in classifier:RUN, ...; KID ...",
    then the equal-size excess and the notes, one a line."""
    text = (
        f"FID {fig(result['fid'])}{_span_words(result, 'fid_interval')} (floor {fig(result['fid_floor'])}"
        f"{_span_words(result, 'fid_floor_interval')} from {result['n_floor']} vs "
        f"{result['n_reference']} real) in {result['features']}, {result['n_fake']} {what} vs "
        f"{result['n_reference']} real; {format_kid(result['kid'], result['kid_std'])}"
    )
    if result.get("fid_excess_interval"):
        lo, hi = result["fid_excess_interval"]
        text += (
            f"; at equal size ({result['n_excess']} vs {result['n_excess']}) {what} minus real "
            f"{fig(result['fid_excess'])} [{fig(lo)}, {fig(hi)}] (95%, {result['bootstraps']} bootstrap replicates)"
        )
    return "\n".join([text, *(f"  note: {note}" for note in result.get("notes", []))])


def _span_words(result: dict, key: str) -> str:
    """ " [6.80, 9.20]": a 95% interval, or "" without one."""
    span = result.get(key)
    return f" [{fig(span[0])}, {fig(span[1])}]" if span else ""


def format_kid(kid: float, kid_std: float | None = None) -> str:
    """ "KID x1e3 3.01 +- 0.12": KID with its scale, as every command prints it."""
    text = f"KID x1e3 {fig(kid * KID_SCALE)}"
    return text + (f" +- {fig(kid_std * KID_SCALE)}" if kid_std is not None else "")
