"""Counting on scenes, beyond the hit rate: how many objects a prior draws for "two / three / four SHAPEs", and
how many of them are of another shape.

    python -m bench.counting --prior runs/compositional/prior --data runs/compositional/data
    python -m bench.counting --prior runs/compositional/prior --data runs/compositional/data --checkpoint 500

Every count with every shape ("three stars": 3 x 6 = 18 prompts, --n images each, the prior's sampling defaults
unless --guidance/--steps say otherwise). The reader (evaluation/scenes.py) finds the objects of each image; per
count asked: the share right (that many objects, all of the named shape: the counting task's judge), how often
each number of objects was drawn, and the share of the objects drawn that are of another shape. It tells one
object too few from one too many, and a miscount from a crowded scene whose shapes drift.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from latentdiff.data.scenes import NUMBERS, SHAPES, Scene, SceneObject, caption_for, parse_caption
from latentdiff.evaluation.scenes import _to_hwc, detect

from .common import add_scenes_prior_flags, load_scenes_prior, parser, prior_name, report, table


def counting_captions() -> list[str]:
    """The 18 counting captions: each count (2, 3, 4) with each shape, count-major."""
    return [
        caption_for(Scene("counting", tuple(SceneObject(shape, "red", (0.5, 0.5), 0.3) for _ in range(k))))
        for k in NUMBERS
        for shape in SHAPES
    ]  # colours and placement unread


def drawn_shapes(images: torch.Tensor | np.ndarray, palette: dict) -> list[list[str]]:
    """Per image, the shapes of the objects the reader finds (largest first). images: (N, 3, H, W) uint8, or
    float in [-1, 1]."""
    return [[d.shape for d in detect(image, palette)] for image in _to_hwc(images)]


def counting_summary(drawn: Sequence[list[str]], captions: Sequence[str]) -> dict:
    """Per count asked ("2", "3", "4"): images, right (that many objects, all the named shape), drawn (number
    of objects -> images) and other_shape (share of the objects drawn not of the named shape). Raises
    ValueError for a count of drawn lists other than of captions, or a caption of another task."""
    if len(drawn) != len(captions):
        raise ValueError(f"{len(drawn)} images but {len(captions)} captions")
    by_count: dict[int, list[tuple[str, list[str]]]] = {k: [] for k in NUMBERS}
    for caption, shapes in zip(captions, drawn):
        prompt = parse_caption(caption)
        if prompt.task != "counting":
            raise ValueError(f"{caption!r} is not a counting caption")
        by_count[prompt.count].append((prompt.objects[0][0], shapes))
    out = {}
    for k, rows in by_count.items():
        objects = sum(len(shapes) for _, shapes in rows)
        out[str(k)] = {
            "images": len(rows),
            "right": round(sum(len(s) == k and set(s) == {want} for want, s in rows) / len(rows), 3) if rows else 0.0,
            "drawn": dict(sorted(Counter(len(s) for _, s in rows).items())),
            "other_shape": round(sum(x != want for want, s in rows for x in s) / objects, 3) if objects else 0.0,
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    p = parser("counting", __doc__)
    add_scenes_prior_flags(p, n=4)
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n is the images per caption, at least 1; got {args.n}")
    pipe, palette, options, figures = load_scenes_prior(args)
    captions = counting_captions()
    images = pipe(captions, n=args.n, seed=args.seed, **options)
    per_image = [c for c in captions for _ in range(args.n)]
    figures["counts"] = counts = counting_summary(drawn_shapes(images, palette), per_image)

    name = prior_name(figures)
    most = max(max(c["drawn"], default=0) for c in counts.values())
    rows = [[name, k, c["images"], c["right"], *(c["drawn"].get(m, 0) for m in range(most + 1)), c["other_shape"]]
            for k, c in counts.items()]  # fmt: skip
    text = table(["prior", "asked", "images", "right", *(f"drawn {m}" for m in range(most + 1)), "other shape"], rows)
    report("counting", "Counting: how many objects are drawn, and of which shape", text, figures, args.out)
    return figures


if __name__ == "__main__":
    main()
