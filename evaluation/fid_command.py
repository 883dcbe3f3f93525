"""`latentdiff fid --real A --fake B --features SPEC`: FID (and KID) between any two image sets.

A and B are folders of PNG/JPG files or webdataset shards (a dataset directory or a shard
pattern; --split picks the split). The real set is split into a reference and a disjoint
holdout of the fake set's size, and the FID of the holdout to the reference is printed beside
the result as the floor (fid.real_reference). Real statistics are cached.

Every FID comes with its noise (a bootstrap interval; noise.py) and notes that say when it is
within real-vs-real noise; a real set too small for the comparison gets the command that makes
its split larger (`more_real_images`). Generated images of another size than the real ones are
resized to the real size and the output says so; other aspect ratios are refused
(images.match_size).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from latentdiff.core.checkpoint import write_json
from latentdiff.core.errors import cli_errors
from latentdiff.core.runtime import Runtime
from latentdiff.data.reader import read_info

from . import noise
from .features import load_feature_space
from .fid import StatisticsCache, default_cache_dir, describe, real_reference, score_images
from .images import load_image_set

MIN_REAL = 4  # a reference and a floor holdout of at least 2 images each


def add_feature_args(p: argparse.ArgumentParser, required: bool = True, without: str = "") -> None:
    """The flags every command that computes FID takes; `without`: what an optional --features' absence means."""
    p.add_argument(
        "--features",
        required=required,
        metavar="SPEC",
        help="feature space: classifier:RUN (from `latentdiff train classifier`), clip:RUN "
        "(from `latentdiff train text`) or inception (torch-fidelity's Inception-v3)"
        + (f"; without it, {without}" if without else ""),
    )
    p.add_argument(
        "--inception-weights",
        metavar="FILE",
        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: its torch hub cache)",
    )
    p.add_argument(
        "--cache-dir",
        default=str(default_cache_dir()),
        help="where real-image statistics are cached (default: %(default)s)",
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached statistics")
    p.add_argument("--batch-size", type=int, default=100, help="images per feature-extraction batch")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=noise.FID_BOOTSTRAPS,
        metavar="B",
        help="bootstrap replicates for FID's 95%% intervals (default: %(default)s; 0: no intervals)",
    )
    p.add_argument("--device", help="force a device (default: cuda if available, else cpu)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentdiff fid", description=__doc__.split("\n\n")[0])
    p.add_argument("--real", required=True, help="real images: a folder of PNG/JPG files, or shards")
    p.add_argument("--fake", required=True, help="generated images: a folder of PNG/JPG files, or shards")
    add_feature_args(p)
    p.add_argument("--split", default="test", help="split read when --real is shards (default: %(default)s)")
    p.add_argument("--fake-split", default="test", help="split read when --fake is shards (default: %(default)s)")
    p.add_argument("--n-real", type=int, help="use the first N real images (default: all)")
    p.add_argument("--n-fake", type=int, help="use the first N generated images (default: all)")
    p.add_argument(
        "--resolution",
        type=int,
        help="resize and center-crop every image to R x R on reading (needed when a folder mixes sizes)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    return p


def check_bootstrap(replicates: int) -> int:
    if replicates != 0 and replicates < 2:
        raise ValueError(f"--bootstrap {replicates}: give 0 (no intervals) or at least 2 replicates (default 50)")
    return replicates


def wanted_real(n_fake: int, dims: int) -> int:
    """Real images for a floor at the generated set's size and a full-rank reference: n_fake + max(n_fake, D)."""
    return n_fake + max(n_fake, dims)


MAX_SPLIT_FRACTION = 0.5  # a larger test (or val) share than this leaves train too little to offer


def more_real_images(source: str, split: str, have: int, wanted: int, fewer_flag: str = "--n") -> str:
    """The sentence that offers a larger real set: the `latentdiff data` command that rebuilds it, when known.

    A `data folder` dataset gets the --test-fraction (or --val-fraction) that yields `wanted`
    images, or, when that would take more than half the folder, the advice to compare fewer
    generated images (`fewer_flag`: the command's flag for their count).
    """
    head = (
        f"only {have} real images in {source} ({split}); {wanted} would give a floor at the generated set's "
        "size and a full-rank reference"
    )
    info = read_info(source) if Path(source).is_dir() else {}
    if info.get("source") == "folder" and split in ("val", "test"):
        total = sum(info.get("splits", {}).values())
        fraction = math.ceil(100 * wanted / total) / 100 if total else 1.0
        if fraction <= MAX_SPLIT_FRACTION:
            seed = f" --seed {info['seed']}" if info.get("seed") else ""
            return (
                f"{head}: rebuild it with a larger {split} split, latentdiff data folder "
                f"{info.get('source_dir', 'SRC')} --out {source} --resolution {info.get('resolution', 'R')}{seed} "
                f"--{split}-fraction {fraction:g} --overwrite (about {wanted} images: the split goes by a hash of "
                "each file's path)"
            )
        return (
            f"{head}, but the folder holds {total} usable images in all: compare fewer generated images "
            f"({fewer_flag} {max(have // 2, 2)}), or add images to the folder"
        )
    if info.get("source") == "shapes" and split in ("val", "test"):
        train = info.get("splits", {}).get("train", "N")
        return (
            f"{head}: rebuild it with a larger {split} split, latentdiff data shapes --out {source} --n {train} "
            f"--resolution {info.get('resolution', 'R')} --seed {info.get('seed', 0)} --{split}-n {wanted} "
            "--overwrite"
        )
    return f"{head}: score against more real images"


def run(args: argparse.Namespace) -> dict:
    check_bootstrap(args.bootstrap)
    rt = Runtime.setup(0, "fp32", args.device)
    rt.announce(args.device)
    device = rt.device
    space = load_feature_space(args.features, inception_weights=args.inception_weights, device=device)
    real = load_image_set(args.real, split=args.split, limit=args.n_real, resolution=args.resolution)
    fake = load_image_set(args.fake, split=args.fake_split, limit=args.n_fake, resolution=args.resolution)
    if len(real) < MIN_REAL:
        raise ValueError(
            f"{len(real)} real images are too few to split into a reference and a floor holdout; "
            + more_real_images(args.real, args.split, len(real), wanted_real(len(fake), 0), "--n-fake")
        )
    cache = StatisticsCache(None if args.no_cache else args.cache_dir)
    ref = real_reference(real.images, len(fake), space, cache, args.batch_size, verbose=True)
    result = score_images(space, fake.images, ref, args.batch_size, True, args.bootstrap)
    wanted = wanted_real(len(fake), result["feature_dims"])
    if len(real) < wanted and args.n_real is None:
        result["notes"].append(more_real_images(args.real, args.split, len(real), wanted, "--n-fake"))
    result.update(
        {
            "real": real.source,
            "fake": fake.source,
            "real_size": list(real.images.shape[-2:]),
            "fake_size": list(fake.images.shape[-2:]),
            "cached_real_statistics": cache.hits,
        }
    )
    print(describe(result))
    if args.json:
        write_json(Path(args.json), result)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with cli_errors():
        return run(args)


if __name__ == "__main__":
    main()
