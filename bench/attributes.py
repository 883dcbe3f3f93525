"""Colour on scenes, beyond the hit rate: which colour a prior draws for the one a caption names, and on colour
attribution whether both colours are right, swapped between the objects, or one colour painted on both.

    python -m bench.attributes --prior runs/compositional/prior --data runs/compositional/data
    python -m bench.attributes --prior runs/compositional/prior --data runs/compositional/data --checkpoint 500

1. Colours: every colour with every shape ("a red star": 8 x 6 = 48 prompts, --n images each, the prior's
   sampling defaults unless --guidance/--steps say otherwise). For each image where the reader
   (evaluation/scenes.py) finds the named shape, the colour of the largest such object: the share right and
   the confusion (asked -> drawn), which tells a colour never learned (drawn at random) from two colours
   the prior confuses.
2. Colour attribution: each ordered pair of two different shapes with --pairs pairs of two different colours
   drawn for it ("a red star and a blue ring": 30 x 4 = 120 prompts by default, the colours drawn with
   --seed). Where the reader finds both named shapes (the largest of each, as the task's judge takes), the
   outcome: right (both colours as named), swapped (each has the other's colour), one right, neither; and
   apart, the share where both objects have one colour. A prior that reads the colours as a bag, without
   binding them to their shapes, scores swapped as often as right; the task's hit rate cannot tell that from
   colours it cannot draw at all, these can.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from latentdiff.data.scenes import COLORS, SHAPES, Scene, SceneObject, caption_for, parse_caption
from latentdiff.evaluation.scenes import _to_hwc, detect

from .common import device, parser, report, table

OUTCOMES = ("right", "swapped", "first only", "second only", "neither")


def _caption(task: str, named: Sequence[tuple[str, str]]) -> str:
    """The scenes caption of `task` naming (shape, colour) pairs in order (data/scenes.py's template)."""
    return caption_for(Scene(task, tuple(SceneObject(s, c, (0.5, 0.5), 0.3) for s, c in named)))  # placement unread


def colour_captions() -> list[str]:
    """The 48 colours captions: each colour with each shape, colour-major."""
    return [_caption("colors", [(shape, colour)]) for colour in COLORS for shape in SHAPES]


def attribution_captions(pairs: int = 4, seed: int = 1) -> list[str]:
    """Colour attribution captions: each ordered pair of different shapes, `pairs` colour pairs each (distinct
    within a shape pair, drawn with `seed`). Raises ValueError for pairs outside 1..56 (8 x 7 ordered pairs)."""
    colour_pairs = list(itertools.permutations(COLORS, 2))
    if not 1 <= pairs <= len(colour_pairs):
        raise ValueError(f"pairs is the colour pairs per shape pair, 1 to {len(colour_pairs)}; got {pairs}")
    rng = random.Random(seed)
    return [
        _caption("color_attr", [(a, c), (b, d)])
        for a, b in itertools.permutations(SHAPES, 2)
        for c, d in rng.sample(colour_pairs, pairs)
    ]


def drawn_colours(images: torch.Tensor | np.ndarray, captions: Sequence[str], palette: dict) -> list[list[str | None]]:
    """Per image, the colour of the largest object of each shape its caption names (None: the shape is missing).
    images: (N, 3, H, W) uint8, or float in [-1, 1]; captions: scenes captions naming colours. Raises ValueError
    for a count of images other than of captions."""
    arrays = _to_hwc(images)
    if len(arrays) != len(captions):
        raise ValueError(f"{len(arrays)} images but {len(captions)} captions")
    out = []
    for image, caption in zip(arrays, captions):
        found = detect(image, palette)  # largest first
        out.append([next((d.color for d in found if d.shape == s), None) for s, _ in parse_caption(caption).objects])
    return out


def colour_summary(drawn: Sequence[list[str | None]], captions: Sequence[str]) -> dict:
    """found (share with the shape drawn), right (share of those in the named colour), confusion asked -> drawn."""
    asked = [parse_caption(c).objects[0][1] for c in captions]
    pairs = [(a, d[0]) for a, d in zip(asked, drawn) if d[0] is not None]
    confusion: dict[str, dict[str, int]] = {colour: {} for colour in COLORS}
    for a, d in pairs:
        confusion[a][d] = confusion[a].get(d, 0) + 1
    return {
        "images": len(captions),
        "found": round(len(pairs) / len(captions), 3) if captions else 0.0,
        "right": round(sum(a == d for a, d in pairs) / len(pairs), 3) if pairs else 0.0,
        "confusion": confusion,
    }


def attribution_outcome(asked: tuple[str, str], drawn: tuple[str, str]) -> str:
    """One of OUTCOMES for the colours drawn on the two named shapes against those asked (in naming order)."""
    if drawn == asked:
        return "right"
    if drawn == asked[::-1]:
        return "swapped"
    if drawn[0] == asked[0]:
        return "first only"
    if drawn[1] == asked[1]:
        return "second only"
    return "neither"


def attribution_summary(drawn: Sequence[list[str | None]], captions: Sequence[str]) -> dict:
    """both_found (share), the share of each outcome and same_colour among the images with both shapes."""
    found = []
    for caption, colours in zip(captions, drawn):
        if None not in colours:
            asked = tuple(c for _, c in parse_caption(caption).objects)
            found.append((attribution_outcome(asked, tuple(colours)), colours[0] == colours[1]))
    counts = Counter(outcome for outcome, _ in found)
    shares = {o: round(counts[o] / len(found), 3) if found else 0.0 for o in OUTCOMES}
    return {
        "images": len(captions),
        "both_found": round(len(found) / len(captions), 3) if captions else 0.0,
        **shares,
        "same_colour": round(sum(same for _, same in found) / len(found), 3) if found else 0.0,
    }


def main(argv: list[str] | None = None) -> dict:
    p = parser("attributes", __doc__)
    p.add_argument("--prior", required=True, help="a scenes prior run")
    p.add_argument("--data", required=True, help="the scenes data it was trained on (its info.json's palette)")
    p.add_argument("--n", type=int, default=2, help="images per colours caption (default: %(default)s)")
    p.add_argument("--pairs", type=int, default=4, help="colour pairs per shape pair (default: %(default)s)")
    p.add_argument("--guidance", type=float, help="default: the prior's [sampling] guidance")
    p.add_argument("--steps", type=int, help="default: the prior's [sampling] steps")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--checkpoint", type=int, help="the step of a checkpoint the run keeps (default: its newest)")
    args = p.parse_args(argv)
    try:
        pair_captions = attribution_captions(args.pairs, args.seed)
    except ValueError as e:
        p.error(str(e))
    from latentdiff.data.reader import read_info
    from latentdiff.prior.pipeline import TextToImage

    palette = read_info(args.data)["palette"]
    pipe = TextToImage.from_run(args.prior, device=device(), checkpoint=args.checkpoint)
    options = {k: v for k, v in {"guidance": args.guidance, "steps": args.steps}.items() if v is not None}
    captions = colour_captions()
    settings = pipe.settings(captions[:1], n=1, **options)
    figures = {"run": args.prior, "checkpoint": pipe.checkpoint, "sampler": settings.sampler,
               "steps": settings.steps, "guidance": settings.guidance}  # fmt: skip

    images = pipe(captions, n=args.n, seed=args.seed, **options)
    per_image = [c for c in captions for _ in range(args.n)]
    figures["colors"] = colours = colour_summary(drawn_colours(images, per_image, palette), per_image)
    images = pipe(pair_captions, n=1, seed=args.seed, **options)
    figures["color_attr"] = attr = attribution_summary(drawn_colours(images, pair_captions, palette), pair_captions)

    at = f", step {figures['checkpoint']}" if figures["checkpoint"] is not None else ""
    name = f"{args.prior} (w = {figures['guidance']:g}{at})"
    confusion = [[asked, sum(row.values()), row.get(asked, 0),
                  ", ".join(f"{d} {k}" for d, k in sorted(row.items(), key=lambda x: -x[1]) if d != asked) or "-"]
                 for asked, row in colours["confusion"].items()]  # fmt: skip
    parts = [
        table(["colours: prior", "images", "shape found", "colour right"],
              [[name, colours["images"], colours["found"], colours["right"]]]),
        table(["asked", "found", "drawn as asked", "drawn otherwise"], confusion),
        table(["colour attribution: prior", "images", "both shapes found", *OUTCOMES, "one colour on both"],
              [[name, attr["images"], attr["both_found"], *(attr[o] for o in OUTCOMES), attr["same_colour"]]]),
    ]  # fmt: skip
    report("attributes", "Colour: what is drawn for a named colour, and colour binding", "\n\n".join(parts),
           figures, args.out)  # fmt: skip
    return figures


if __name__ == "__main__":
    main()
