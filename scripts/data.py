"""`latentdiff data ...`: write a dataset directory of webdataset shards from a built-in source.

latentdiff data fashion-mnist --out datasets/fmnist
latentdiff data shapes --out datasets/shapes --n 20000 --holdout "blue triangle"
latentdiff data folder photos/ --out data/photos --resolution 64
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from latentdiff.core.outputs import fresh_output_dir
from latentdiff.data import fashion_mnist, folder, shapes
from latentdiff.data.images import DEFAULT_MAX_PIXELS
from latentdiff.data.shards import DEFAULT_MAXCOUNT, SPLITS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentdiff data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="SOURCE")

    def common(p: argparse.ArgumentParser, resolution_required: bool = False) -> None:
        p.add_argument("--out", required=True, help="dataset directory to write (shards + info.json), new or empty")
        p.add_argument(
            "--overwrite", action="store_true", help="replace the shards and info.json of a dataset in --out"
        )
        if resolution_required:
            p.add_argument("--resolution", type=int, required=True, help="output images are R x R")
        else:
            p.add_argument("--resolution", type=int, default=32, help="output images are R x R (default 32)")
        p.add_argument("--maxcount", type=int, default=DEFAULT_MAXCOUNT, help="samples per shard")
        p.add_argument("--seed", type=int, default=0, help="seed of captions, attributes or the split")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("fashion-mnist", help="Fashion-MNIST from its IDX files")
    common(p)
    p.add_argument(
        "--source", dest="source_dir", default=fashion_mnist.DEFAULT_SOURCE, help="folder with the four IDX files"
    )

    p = sub.add_parser("shapes", help="procedural coloured shapes with compositional captions")
    common(p)
    p.add_argument("--n", type=int, required=True, help="number of training images")
    p.add_argument("--val-n", type=int, default=None, help="validation images (default n // 10)")
    p.add_argument("--test-n", type=int, default=None, help="test images (default n // 10)")
    p.add_argument(
        "--holdout", nargs="+", action="extend", default=[], metavar="COMBO",
        help='attribute combinations kept out of train, e.g. "blue triangle" or "triangle"',
    )  # fmt: skip

    p = sub.add_parser("folder", help="images with a same-named .txt caption beside each")
    p.add_argument("src", help="folder of images and captions (searched recursively)")
    common(p, resolution_required=True)
    p.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
        help="skip images over N pixels, checked before decoding (default %(default)s, Pillow's "
        "decompression-bomb limit); 0 removes the limit",
    )  # fmt: skip
    return parser


def _run(args: argparse.Namespace) -> dict[str, Any]:
    progress = not args.quiet
    if args.command == "fashion-mnist":
        return fashion_mnist.convert(
            args.out, args.source_dir, args.resolution, args.maxcount, args.seed, progress=progress
        )
    if args.command == "shapes":
        return shapes.build(
            args.out, args.n, args.val_n, args.test_n, args.seed, args.resolution, args.holdout,
            args.maxcount, progress=progress,
        )  # fmt: skip
    if args.max_pixels < 0:
        raise ValueError(f"--max-pixels must be >= 0 (0: no limit), got {args.max_pixels}")
    return folder.convert(
        args.src, args.out, args.resolution, args.seed, maxcount=args.maxcount, progress=progress,
        max_pixels=args.max_pixels or None,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (without the word "data"), write the dataset, print a one-line summary; 0 or 2."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        fresh_output_dir(args.out, args.overwrite, ours=["*.tar", "info.json"])
        info = _run(args)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"latentdiff data {args.command}: error: {e}", file=sys.stderr)
        return 2
    counts = " ".join(f"{s}={info['splits'].get(s, 0)}" for s in SPLITS)
    print(f"{info['source']}: {counts} skipped={info.get('skipped', 0)} resolution={info['resolution']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
