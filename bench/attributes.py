"""Colour on scenes, beyond the hit rate: which colour a prior draws for the one a caption names, and on colour
attribution whether both colours are right, swapped between the objects, or one colour painted on both.

    python -m bench.attributes --prior runs/compositional/prior --data runs/compositional/data
    python -m bench.attributes --prior runs/compositional/prior --data runs/compositional/data --checkpoint 500
    python -m bench.attributes --prior runs/compositional/prior --data runs/compositional/data --reading

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
3. With --reading, what each object is read from: on up to --scenes real colour attribution test scenes of
   --data, encoded by the prior's autoencoder and noised to t = 0.9, 0.6 and 0.3 of T (one forward each, no
   sampling), the cross-attention at each object's positions (the cells of each transformer's grid that it
   covers half or more of, else its most covered cell), summed over the tokens of its own colour word, the
   other object's colour word, its own shape word, the other's shape word and the rest (start, end, "a",
   "and"); the mean over objects, per transformer. A prior that binds by attention reads each object from
   its own words; one that reads only the shape word gets the colour from the shape word's state, which
   (a causal encoder) carries every colour named before it.
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

from .common import add_scenes_prior_flags, load_scenes_prior, parser, prior_name, report, table

OUTCOMES = ("right", "swapped", "first only", "second only", "neither")
READS = ("own colour", "other colour", "own shape", "other shape", "rest")
READ_AT = (0.9, 0.6, 0.3)  # the timesteps of --reading, as fractions of T


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


def object_cells(obj: dict, grid: int) -> np.ndarray:
    """The cells (row-major indices of a grid x grid map) where --reading reads an object of a scenes json: those
    it covers half or more of, else its most covered one."""
    from latentdiff.prior.grounding import cell_cover

    cover = cell_cover(obj["shape"], tuple(obj["center"]), float(obj["side"]), grid).flatten()
    return np.nonzero(cover >= 0.5)[0] if (cover >= 0.5).any() else np.array([int(cover.argmax())])


def reading_shares(maps: Sequence[torch.Tensor], captions: Sequence[str], metas: Sequence[dict], tokenizer) -> dict:
    """What each object's positions read, per transformer: {"objects": count read, "shares": [{READS: share}]}.

    maps: UNet.cross_attention_maps' list, each (B, h * w, T); captions and metas: B colour attribution scenes
    (their json lists the objects in naming order). An object's positions: the cells of the map's grid it
    covers half or more of, else its most covered one; a share is the attention those positions give the
    words' tokens, averaged over them, then over objects. Captions the tokenizer splits otherwise are skipped.
    """
    from latentdiff.prior.binding import caption_groups

    groups = [caption_groups(tokenizer, caption) for caption in captions]  # [(colour, shape tokens)] per object
    shares, objects = [], 0
    for probs in maps:
        grid = int(round(probs.shape[1] ** 0.5))
        rows, objects = [], 0
        for b, (meta, named) in enumerate(zip(metas, groups)):
            if not named:
                continue
            colour, shape = (named[0][0], named[1][0]), (named[0][1], named[1][1])
            for o, obj in enumerate(meta["objects"]):
                read = probs[b, object_cells(obj, grid)].float().mean(dim=0).cpu()  # (T,)
                own = [float(read[w].sum()) for w in (colour[o], colour[1 - o], shape[o], shape[1 - o])]
                rows.append([*own, 1.0 - sum(own)])
                objects += 1
        mean = np.mean(rows, axis=0) if rows else [float("nan")] * len(READS)
        shares.append({k: round(float(v), 3) for k, v in zip(READS, mean)})
    return {"objects": objects, "shares": shares}


@torch.no_grad()
def reading(pipe, test, keep: Sequence[int], seed: int) -> dict:
    """reading_shares on the real colour attribution scenes `keep` (indices) of the ImageSet `test`, at each of
    READ_AT: {"scenes": n, "objects": k, "t": {t: [per transformer {READS: share}]}}."""
    from latentdiff.core.pixels import from_uint8
    from latentdiff.prior.text_conditioning import text_conditioning

    captions, metas = [test.captions[i] for i in keep], [test.metas[i] for i in keep]
    unet = pipe.unet
    dev = next(unet.parameters()).device
    x = from_uint8(test.images[keep]).to(dev)
    z0 = pipe.latent_space.to_prior(pipe.autoencoder.encode(x).mean)
    states, mask, pooled = text_conditioning(pipe.encoder, captions)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out: dict = {"scenes": len(keep), "t": {}}
    for fraction in READ_AT:
        t = torch.full((len(keep),), int(fraction * pipe.schedule.T), device=dev)
        eps = torch.randn(z0.shape, generator=generator).to(dev)
        with unet.cross_attention_maps() as maps:
            unet(pipe.schedule.q_sample(z0, t, eps), t.float(), states, mask, pooled)
        read = reading_shares(maps, captions, metas, pipe.encoder.tokenizer)
        out["objects"], out["t"][int(t[0])] = read["objects"], read["shares"]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = parser("attributes", __doc__)
    add_scenes_prior_flags(p, n=2)  # --n: images per colours caption
    p.add_argument("--pairs", type=int, default=4, help="colour pairs per shape pair (default: %(default)s)")
    p.add_argument("--reading", action="store_true", help="also what each object's positions read (3. above)")
    p.add_argument("--scenes", type=int, default=80, help="test scenes --reading reads (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        pair_captions = attribution_captions(args.pairs, args.seed)
    except ValueError as e:
        p.error(str(e))
    if args.reading:  # refused before any model is loaded
        from latentdiff.evaluation.images import load_image_set

        if args.scenes < 1:
            p.error(f"--scenes is the test scenes --reading reads, at least 1; got {args.scenes}")
        test = load_image_set(args.data, split="test")
        keep = [i for i, m in enumerate(test.metas) if (m or {}).get("task") == "color_attr"][: args.scenes]
        if not keep:
            p.error(f"{args.data} has no colour attribution scene in its test split for --reading")
    pipe, palette, options, figures = load_scenes_prior(args)
    captions = colour_captions()
    images = pipe(captions, n=args.n, seed=args.seed, **options)
    per_image = [c for c in captions for _ in range(args.n)]
    figures["colors"] = colours = colour_summary(drawn_colours(images, per_image, palette), per_image)
    images = pipe(pair_captions, n=1, seed=args.seed, **options)
    figures["color_attr"] = attr = attribution_summary(drawn_colours(images, pair_captions, palette), pair_captions)

    name = prior_name(figures)
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
    if args.reading:
        figures["reading"] = read = reading(pipe, test, keep, args.seed)
        parts.append(table(
            [f"what an object reads ({read['scenes']} real scenes, {read['objects']} objects)", "transformer", *READS],
            [[f"t = {t}", k, *(row[r] for r in READS)] for t, rows in read["t"].items() for k, row in enumerate(rows)],
        ))  # fmt: skip
    report("attributes", "Colour: what is drawn for a named colour, and colour binding", "\n\n".join(parts),
           figures, args.out)  # fmt: skip
    return figures


if __name__ == "__main__":
    main()
