"""Position on scenes, beyond the hit rate: does a prior place the first-named shape by the relation at all,
and do a text run's token states say which shape was named first?

    python -m bench.relations --prior runs/compositional/prior --data runs/compositional/data
    python -m bench.relations --text runs/compositional/text          # the text states alone
    python -m bench.relations --prior runs/compositional/prior --data runs/compositional/data --checkpoint 500

1. --prior: every ordered pair of two different shapes under every relation ("a star to the left of a
   ring": 30 x 4 = 120 prompts, --n images each, the prior's sampling defaults unless --guidance/--steps
   say otherwise). For each image where the reader (evaluation/scenes.py) finds both named shapes, the
   signed offset of the first's centre from the second's on the relation's axis, in fractions of the
   image, positive in the direction asked. A prior that ignores the relation scores a mean of 0 and holds
   as often as flipped (the position task's rule: offset >= MIN_OFFSET; flipped: <= -MIN_OFFSET); the
   task's hit rate cannot tell that from a weak preference, the mean and its standard error can.
   With --attention, also where the prior's cross-attention reads each named shape at the sampler's first
   step (t = T - 1 on pure noise, where nothing is drawn yet): per transformer, the signed offset of the
   first shape word's attention centroid from the second's, on the relation's axis, in fractions of the
   image, averaged over the 120 captions. 0 when the attention places the words regardless of the relation.
2. --text: the cosine between a shape's state where it is named first ("a star above a ring") and where
   it is named second ("a ring above a star"), against two different shapes in the same slot, averaged
   over the same 120 captions. Near 1 against near 0: a state says which word it is, not where it stands,
   and a cross-attention without positions reads the two captions alike.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch

from latentdiff.data.scenes import MIN_OFFSET, RELATIONS, SHAPES, Scene, SceneObject, caption_for, parse_caption
from latentdiff.evaluation.scenes import _to_hwc, detect

from .common import add_scenes_prior_flags, load_scenes_prior, parser, prior_name, report, table


def position_caption(first: str, second: str, relation: str) -> str:
    """The scenes caption "a FIRST <relation words> a SECOND" (data/scenes.py's template)."""
    objects = tuple(SceneObject(shape, "red", (0.5, 0.5), 0.3) for shape in (first, second))  # placement unread
    return caption_for(Scene("position", objects, relation))


def position_captions() -> list[str]:
    """The 120 position captions: each ordered pair of different shapes under each relation."""
    pairs = itertools.product(itertools.permutations(SHAPES, 2), RELATIONS)
    return [position_caption(a, b, relation) for (a, b), relation in pairs]


def signed_offsets(images: torch.Tensor | np.ndarray, captions: Sequence[str], palette: dict) -> np.ndarray:
    """(N,) offsets of the first-named shape from the second on each caption's axis, positive as asked;
    NaN where the reader misses either shape. images: (N, 3, H, W) uint8, or float in [-1, 1]."""
    arrays = _to_hwc(images)
    if len(arrays) != len(captions):
        raise ValueError(f"{len(arrays)} images but {len(captions)} captions")
    out = np.full(len(captions), np.nan)
    for k, (image, caption) in enumerate(zip(arrays, captions)):
        prompt = parse_caption(caption)
        if prompt.relation is None:
            raise ValueError(f"not a position caption: {caption!r}")
        (first, _), (second, _) = prompt.objects
        found = detect(image, palette)  # largest first: the largest of each shape, as the task's judge takes
        a = next((d for d in found if d.shape == first), None)
        b = next((d for d in found if d.shape == second), None)
        if a is not None and b is not None:
            _, axis, sign = RELATIONS[prompt.relation]
            out[k] = sign * (a.center[axis] - b.center[axis])
    return out


def offset_summary(offsets: np.ndarray) -> dict:
    """both_found (share), mean and sem of the offsets found, holds (>= MIN_OFFSET), flipped (<= -MIN_OFFSET)."""
    found = offsets[~np.isnan(offsets)]
    if not len(found):
        return {"images": len(offsets), "both_found": 0.0}
    return {
        "images": len(offsets),
        "both_found": round(len(found) / len(offsets), 3),
        "mean_offset": round(float(found.mean()), 4),
        "sem": round(float(found.std(ddof=1) / math.sqrt(len(found))) if len(found) > 1 else float("nan"), 4),
        "holds": round(float((found >= MIN_OFFSET).mean()), 3),
        "flipped": round(float((found <= -MIN_OFFSET).mean()), 3),
    }


@torch.no_grad()
def attention_offsets(unet, encoder, latent_shape: Sequence[int], t: int, seed: int = 0) -> list[float]:
    """Per transformer of `unet` (in forward order), the mean over position_captions() of the signed offset of
    the first shape word's cross-attention centroid from the second's, at timestep t on z ~ N(0, I) (module
    docstring, 1: t = T - 1, the sampler's first step). Centroids over each transformer's (h, w) grid, cell
    centres in fractions of the image. latent_shape: (c, h, w); unet and encoder (a TextEncoder) on one device."""
    from latentdiff.prior.grounding import word_token_positions
    from latentdiff.prior.text_conditioning import text_conditioning

    captions = position_captions()
    states, mask, pooled = text_conditioning(encoder, captions)
    z = torch.randn(len(captions), *latent_shape, generator=torch.Generator().manual_seed(seed)).to(states.device)
    with unet.cross_attention_maps() as maps:
        unet(z, torch.full((len(captions),), float(t), device=states.device), states, mask, pooled)
    words, axes, signs = [], [], []
    for caption in captions:
        spans = word_token_positions(encoder.tokenizer, caption)  # "a FIRST <relation> a SECOND"
        words.append((spans[1], spans[-1]))
        _, axis, sign = RELATIONS[parse_caption(caption).relation]
        axes.append(axis)
        signs.append(sign)
    out = []
    for m in maps:  # (N, h * w, T)
        grid = int(round(m.shape[1] ** 0.5))
        rows, cols = np.divmod(np.arange(m.shape[1]), grid)
        xy = torch.tensor(np.stack([cols, rows], 1) + 0.5, dtype=torch.float32) / grid  # (P, 2): x, y
        offsets = []
        for k, (first, second) in enumerate(words):
            a, b = (m[k][:, w].float().sum(dim=1).cpu() for w in (first, second))  # (P,) attention on each word
            centre_a, centre_b = (a @ xy) / a.sum(), (b @ xy) / b.sum()
            offsets.append(signs[k] * float(centre_a[axes[k]] - centre_b[axes[k]]))
        out.append(round(float(np.mean(offsets)), 4))
    return out


def _slot(ids: list[int], word: list[int], start: int) -> int:
    """The index of the first token of `word` at or after `start` in `ids`; raises ValueError if absent."""
    for i in range(start, len(ids) - len(word) + 1):
        if ids[i : i + len(word)] == word:
            return i
    raise ValueError(f"token ids {word} not found in {ids}")


@torch.no_grad()
def slot_similarity(encoder) -> dict:
    """Mean cosine of a shape's state named first against named second (same shape) and of two different
    shapes named first, over position_captions() (module docstring, 2). encoder: a TextEncoder."""
    same, other = [], []
    for caption in position_captions():
        prompt = parse_caption(caption)
        (x, _), (y, _) = prompt.objects
        swapped = position_caption(y, x, prompt.relation)
        states = torch.nn.functional.normalize(encoder.encode([caption, swapped]).states.float(), dim=-1)
        ids = encoder.tokenizer([caption, swapped]).tolist()
        wx, wy = encoder.tokenizer.encode(x), encoder.tokenizer.encode(y)
        x_first, x_second = _slot(ids[0], wx, 1), _slot(ids[1], wx, _slot(ids[1], wy, 1) + len(wy))
        same.append(float(states[0, x_first] @ states[1, x_second]))
        other.append(float(states[0, x_first] @ states[1, _slot(ids[1], wy, 1)]))
    return {
        "same_shape_other_slot": round(float(np.mean(same)), 4),
        "other_shape_same_slot": round(float(np.mean(other)), 4),
    }


def main(argv: list[str] | None = None) -> dict:
    p = parser("relations", __doc__)
    add_scenes_prior_flags(p, n=1, required=False)  # --prior: the signed offsets of its images
    p.add_argument("--text", action="append", default=[], help="a text run (repeatable): the slot similarity")
    p.add_argument("--attention", action="store_true", help="with --prior: where its cross-attention reads "
                   "each shape word at the sampler's first step (module docstring, 1)")  # fmt: skip
    args = p.parse_args(argv)
    if not args.prior and not args.text:
        p.error("give --prior RUN --data DATA, --text RUN, or both")
    if args.prior and not args.data:
        p.error("--prior needs --data (the scenes data's info.json holds the palette)")
    figures, rows = {}, []
    if args.prior:
        pipe, palette, options, loaded = load_scenes_prior(args)
        captions = position_captions()
        images = pipe(captions, n=args.n, seed=args.seed, **options)
        offsets = signed_offsets(images, [c for c in captions for _ in range(args.n)], palette)
        figures["prior"] = {**loaded, **offset_summary(offsets)}
        if args.attention:
            figures["prior"]["attention_offsets"] = attention_offsets(
                pipe.unet, pipe.encoder, pipe.latent_shape, pipe.schedule.T - 1, seed=args.seed
            )
        s = figures["prior"]
        rows.append([f"prior {prior_name(s)}", s["images"], s["both_found"],
                     f"{s.get('mean_offset', float('nan')):+.3f} ± {s.get('sem', float('nan')):.3f}",
                     s.get("holds", "-"), s.get("flipped", "-")])  # fmt: skip
    text_rows = []
    for run in args.text:
        from latentdiff.text.sources import load_text_encoder

        figures.setdefault("text", {})[run] = sim = slot_similarity(load_text_encoder(run))
        text_rows.append([f"text {run}", sim["same_shape_other_slot"], sim["other_shape_same_slot"]])
    parts = []
    if rows:
        parts.append(table(["images of", "images", "both shapes found", "mean offset ± sem", "holds", "flipped"], rows))
        if "attention_offsets" in figures["prior"]:
            offsets = figures["prior"]["attention_offsets"]
            parts.append(table(["cross-attention, first step", *(f"transformer {i}" for i in range(len(offsets)))],
                               [["first word's centroid - second's", *(f"{o:+.3f}" for o in offsets)]]))  # fmt: skip
    if text_rows:
        parts.append(table(["states of", "same shape, other slot", "other shape, same slot"], text_rows))
    report("relations", "Position: signed offsets and slot similarity", "\n\n".join(parts), figures, args.out)
    return figures


if __name__ == "__main__":
    main()
