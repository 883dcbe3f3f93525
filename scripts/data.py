"""`latentdiff data ...`: write a dataset directory of webdataset shards from a built-in source.

latentdiff data fashion-mnist --out datasets/fmnist
latentdiff data shapes --out datasets/shapes --n 20000 --holdout "blue triangle"
latentdiff data scenes --out datasets/scenes --n 20000 --holdout "blue star" "four rings" "circle above square"
latentdiff data folder photos/ --out data/photos --resolution 64

The dataset is written into a staging folder inside --out and swapped in when complete; with
--overwrite only the files the earlier info.json lists are replaced (core/outputs.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from latentdiff.core.outputs import OutputFolder
from latentdiff.data import fashion_mnist, folder, scenes, shapes
from latentdiff.data.images import DEFAULT_MAX_PIXELS
from latentdiff.data.metadata import DEFAULT_CAPTION_COLUMN
from latentdiff.data.shards import DEFAULT_MAXCOUNT, INFO_FILE, SPLITS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentdiff data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="SOURCE")

    def common(p: argparse.ArgumentParser, resolution_required: bool = False, resolution: int = 32) -> None:
        p.add_argument("--out", required=True, help="dataset directory to write (shards + info.json), new or empty")
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace the dataset in --out (the files its info.json lists; any other file there is refused)",
        )
        if resolution_required:
            p.add_argument("--resolution", type=int, required=True, help="output images are R x R")
        else:
            p.add_argument(
                "--resolution", type=int, default=resolution, help=f"output images are R x R (default {resolution})"
            )
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

    p = sub.add_parser("scenes", help="GenEval's six tasks on 1-4 shapes: counting, position, colour binding")
    common(p, resolution=64)
    p.add_argument("--n", type=int, required=True, help="number of training images")
    p.add_argument("--val-n", type=int, default=None, help="validation images (default n // 10)")
    p.add_argument("--test-n", type=int, default=None, help="test images (default n // 10)")
    p.add_argument(
        "--holdout", nargs="+", action="extend", default=[], metavar="COMBO",
        help='combinations kept out of train: "blue star", "four rings", "circle above square"',
    )  # fmt: skip
    p.add_argument(
        "--task-weights", default="", metavar="TASK=N,...",
        help='the train mix, e.g. "position=3,color_attr=3" (unnamed tasks 1; val and test stay uniform)',
    )  # fmt: skip

    p = sub.add_parser(
        "folder", help="images with a same-named caption file beside each, or a diffusers metadata.jsonl / .csv"
    )
    p.add_argument("src", help="folder of images and captions (searched recursively)")
    common(p, resolution_required=True)
    p.add_argument(
        "--caption-ext", default=folder.DEFAULT_CAPTION_EXT, metavar="EXT",
        help="extension of the caption file beside each image (default %(default)s; kohya's trainer writes .caption)",
    )  # fmt: skip
    p.add_argument(
        "--caption-column", default=DEFAULT_CAPTION_COLUMN, metavar="NAME",
        help="the caption's column in a metadata.jsonl / metadata.csv (default %(default)s); that file, where it "
        "lists an image, wins over the image's caption file",
    )  # fmt: skip
    val, test = folder.DEFAULT_FRACTIONS[1:]
    p.add_argument(
        "--val-fraction", type=float, default=val, metavar="F", help="share of the images in val (default %(default)s)"
    )
    p.add_argument(
        "--test-fraction", type=float, default=test, metavar="F",
        help="share of the images in test (default %(default)s), the real reference of FID; 0: no test split",
    )  # fmt: skip
    p.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
        help="skip images over N pixels, checked before decoding (default %(default)s, Pillow's "
        "decompression-bomb limit); 0 removes the limit",
    )  # fmt: skip
    return parser


def _check(args: argparse.Namespace) -> None:
    """Options that can be checked before the output folder is touched."""
    if args.command == "folder":
        if args.max_pixels < 0:
            raise ValueError(f"--max-pixels must be >= 0 (0: no limit), got {args.max_pixels}")
        args.fractions = folder.check_fractions(args.val_fraction, args.test_fraction)
        args.caption_ext = folder.check_caption_ext(args.caption_ext)
    if args.command == "scenes":
        scenes.parse_holdout(args.holdout)
        args.task_weights = scenes.parse_task_weights(args.task_weights)


def _run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    progress = not args.quiet
    if args.command == "fashion-mnist":
        return fashion_mnist.convert(out, args.source_dir, args.resolution, args.maxcount, args.seed, progress=progress)
    if args.command == "shapes":
        return shapes.build(
            out, args.n, args.val_n, args.test_n, args.seed, args.resolution, args.holdout,
            args.maxcount, progress=progress,
        )  # fmt: skip
    if args.command == "scenes":
        return scenes.build(
            out, args.n, args.val_n, args.test_n, args.seed, args.resolution, args.holdout,
            args.maxcount, progress=progress, task_weights=args.task_weights,
        )  # fmt: skip
    return folder.convert(
        args.src, out, args.resolution, args.seed, fractions=args.fractions, maxcount=args.maxcount,
        progress=progress, max_pixels=args.max_pixels or None, caption_ext=args.caption_ext,
        caption_column=args.caption_column,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (without the word "data"), write the dataset, print a one-line summary; 0 or 2."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _check(args)
        with OutputFolder(args.out, args.overwrite, record=INFO_FILE) as output:
            info = _run(args, output.staging)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"latentdiff data {args.command}: error: {e}", file=sys.stderr)
        return 2
    counts = " ".join(f"{s}={info['splits'].get(s, 0)}" for s in SPLITS)
    print(f"{info['source']}: {counts} skipped={info.get('skipped', 0)} resolution={info['resolution']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
