"""`latentdiff fid --real A --fake B --features SPEC`: FID (and KID) between any two image sets.

A and B are folders of PNG/JPG files or webdataset shards (a dataset directory or a shard
pattern; --split picks the split). The real set is split into a reference and a disjoint
holdout of the fake set's size, and the FID of the holdout to the reference is printed beside
the result as the floor (fid.real_reference). Real statistics are cached.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from latentdiff.core.checkpoint import write_json
from latentdiff.core.errors import cli_errors
from latentdiff.core.runtime import Runtime

from .features import load_feature_space
from .fid import StatisticsCache, default_cache_dir, describe, extract_features, real_reference, score, statistics
from .images import load_image_set


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


def run(args: argparse.Namespace) -> dict:
    device = Runtime.setup(0, "fp32", args.device).device
    space = load_feature_space(args.features, inception_weights=args.inception_weights, device=device)
    real = load_image_set(args.real, split=args.split, limit=args.n_real, resolution=args.resolution)
    fake = load_image_set(args.fake, split=args.fake_split, limit=args.n_fake, resolution=args.resolution)
    cache = StatisticsCache(None if args.no_cache else args.cache_dir)
    ref = real_reference(real.images, len(fake), space, cache, args.batch_size, verbose=True)
    result = score(statistics(extract_features(space, fake.images, args.batch_size, verbose=True)), ref)
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
