"""Token grounding: the cross-attention of each word that names an object goes to that object's pixels.

A training loss on the prior's cross-attention maps, TokenCompose's token loss (Wang et al. 2024, CVPR,
eq. 3), which supervises Stable Diffusion's maps with object masks. Here the masks come exactly from a
sample's json (the scenes source lists each object's shape, centre and side): of the attention the words
naming object o receive over the whole map, the share that falls on o's positions should be 1,

    L_ground = mean_{l, o} ( 1 - sum_p M_o(p) a_{l,o}(p) / sum_p a_{l,o}(p) )^2,   a_{l,o}(p) = sum_{j in S_o} A_l(p, j)

A_l (B, h*w, T): transformer l's cross-attention probabilities, averaged over heads (UNet.cross_attention_maps);
o runs over the groups of objects the caption names by the same words: one object each (its colour and its
shape), except a counting caption's, whose number and plural name all its objects at once, so their union is
the place ("three stars": the three stars' cells); M_o(p) = 1 where the group covers any of position p's cell
of the image; S_o: the token positions of the group's words. With `per_word` (config grounding_per_word), as
in TokenCompose's per-token loss, o runs over the words instead: each word's own attention must fall on the
objects it names, so a colour word is not let off by its shape word's mass ("a red star and a blue ring":
"red" on the star, not wherever; grouped, the shape word's mass can carry the group's share). It constrains
where a word is read, not what a position reads: a position may still attend to the start and end tokens (a
causal encoder's end token carries the whole caption). The diffusion loss says which object goes where only
through the few pixels a wrong guess costs; this names the place of every word at every noise level, the
binding that docs/scenes.md found the prior slowest to learn (which side, which colour belongs to which shape).

Grounding.pixel_loss (config grounding_pixel) is TokenCompose's other term, eq. 4: what each position reads. A
prior grounded by L_ground alone reads an object's positions from its shape word (0.6 to 0.9 of their attention
on real colour attribution scenes at t <= 0.6 T, docs/scenes.md) and next to nothing from its colour word (0 to
0.03), so the colour reaches the object only through the shape word's state, which in a causal encoder carries
every colour named before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from latentdiff.data.scenes import COLORS, NUMBERS, PLURALS, SHAPES, shape_mask

SUPERSAMPLE = 8  # points per cell side at which an object's cover of a latent cell is counted
_PLURAL_SHAPES = set(PLURALS.values())
_NUMBER_WORDS = set(NUMBERS.values())


def object_words(caption: str, meta: dict[str, Any] | None) -> list[tuple[int, tuple[int, ...]]]:
    """(word index, the objects it names) for each word of `caption` that names objects of `meta`.

    Words split on whitespace; objects are meta["objects"] in the order the caption names them (the scenes
    source's json). A colour names the object whose shape comes next, a shape the next object; a number or a
    plural names all of them ("three stars"). Returns [] for a caption or json that names no objects this way
    (an empty caption, a sample from another source).
    """
    objects = (meta or {}).get("objects") or []
    words = caption.split()
    if not objects or not words:
        return []
    named: list[tuple[int, tuple[int, ...]]] = []
    everything = tuple(range(len(objects)))
    k = 0  # the object the next shape word names
    for i, word in enumerate(words):
        if word in _NUMBER_WORDS or word in _PLURAL_SHAPES:
            named.append((i, everything))
        elif word in COLORS and k < len(objects):
            named.append((i, (k,)))
        elif word in SHAPES and k < len(objects):
            named.append((i, (k,)))
            k += 1
    return named


def word_token_positions(tokenizer, caption: str) -> list[list[int]] | None:
    """The token positions of each whitespace word of `caption` in the text encoder's ids ([SOT] at 0).

    CLIP's BPE never merges across a space, so a word's tokens are its own encoding; None when the words'
    encodings do not add up to the caption's (text the tokenizer splits or joins otherwise), so no token is
    ever grounded at the wrong place.
    """
    spans, position = [], 1
    for word in caption.split():
        n = len(tokenizer.encode(word))
        spans.append(list(range(position, position + n)))
        position += n
    return spans if position - 1 == len(tokenizer.encode(" ".join(caption.split()))) else None


@lru_cache(maxsize=1 << 17)
def cell_cover(shape: str, center: tuple[float, float], side: float, grid: int) -> np.ndarray:
    """(grid, grid) float32: the share of each cell of a grid x grid partition of the image that the object
    covers; center (x, y) and side as fractions of the image (the scenes json's units).

    Counted on SUPERSAMPLE x SUPERSAMPLE points a cell: on the 4x4 grid of 8x8 latents an object's area comes out
    within about 5% of the exact one on average, 25% at worst (tests/prior/test_grounding.py).
    """
    r = grid * SUPERSAMPLE
    mask = shape_mask(shape, (center[0] * r, center[1] * r), side * r, r)  # (r, r) bool, rows are y
    return mask.reshape(grid, SUPERSAMPLE, grid, SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)


class Grounding:
    """The grounding loss of a training step, from its captions (after caption dropout) and their json."""

    def __init__(self, tokenizer, per_word: bool = False):
        self.tokenizer = tokenizer
        self.per_word = per_word
        self._positions: dict[str, list[list[int]] | None] = {}

    def _token_positions(self, caption: str) -> list[list[int]] | None:
        if caption not in self._positions:
            self._positions[caption] = word_token_positions(self.tokenizer, caption)
        return self._positions[caption]

    def targets(
        self,
        captions: Sequence[str],
        metas: Sequence[dict | None],
        tokens: int,
        grid: int,
        per_word: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(words (B, G, T) float, 1 at the tokens naming group g; cover (B, G, grid * grid)) for a batch.

        A group is the objects a caption names by the same words, in the order first named: one object each,
        or all of a counting caption's, whose cover is then the union of theirs; with per_word, one group a word
        (the objects it names). G is the most groups a sample has; a missing group (fewer, or none named) has no
        tokens and no cover. Tokens past `tokens` (the cut context) are dropped. per_word: None for the
        Grounding's own setting.
        """
        per_word = self.per_word if per_word is None else per_word
        named = [object_words(c, m) for c, m in zip(captions, metas)]
        # a group's key: the objects named, or with per_word the word's index as well (two words, two groups)
        key = (lambda i, objs: (i, objs)) if per_word else (lambda i, objs: (None, objs))
        groups = [list(dict.fromkeys(key(i, objs) for i, objs in pairs)) for pairs in named]
        words = torch.zeros(len(captions), max(map(len, groups), default=0), tokens)
        cover = torch.zeros(len(captions), words.shape[1], grid * grid)
        for b, (caption, meta, pairs) in enumerate(zip(captions, metas, named)):
            spans = self._token_positions(caption) if pairs else None
            if spans is None:
                continue
            for i, objs in pairs:
                words[b, groups[b].index(key(i, objs)), [j for j in spans[i] if j < tokens]] = 1.0
            for g, (_, objs) in enumerate(groups[b]):
                if words[b, g].any():
                    for o in objs:
                        obj = meta["objects"][o]
                        c = cell_cover(obj["shape"], tuple(obj["center"]), float(obj["side"]), grid)
                        cover[b, g] = torch.maximum(cover[b, g], torch.from_numpy(c).flatten())
        return words, cover

    def _batch_targets(self, maps, captions, metas, per_word: bool | None) -> list[tuple]:
        """(probs, words, cover) per map, targets made once a grid."""
        out, cache = [], {}
        for probs in maps:
            B, positions, T = probs.shape
            grid = int(round(positions**0.5))
            if grid not in cache:
                words, cover = self.targets(captions, metas, T, grid, per_word)
                cache[grid] = (words.to(probs.device), cover.to(probs.device))
            out.append((probs, *cache[grid]))
        return out

    def loss(self, maps: Sequence[torch.Tensor], captions: Sequence[str], metas: Sequence[dict | None]) -> torch.Tensor:
        """L_ground (a scalar in [0, 1]; 0 when no sample of the batch names an object) from a forward's maps.

        maps: UNet.cross_attention_maps' list, each (B, h * w, T) on a square grid.
        """
        terms = []
        for probs, words, cover in self._batch_targets(maps, captions, metas, None):
            present = cover.sum(dim=2) > 0  # (B, G): groups named and drawn
            if not present.any():
                continue
            mass = torch.bmm(words, probs.float().transpose(1, 2))  # (B, G, positions): a_o(p)
            inside = (mass * (cover > 0)).sum(dim=2) / mass.sum(dim=2).clamp_min(1e-12)  # (B, G)
            terms.append(((1 - inside[present]) ** 2).mean())
        return _mean(terms, maps)

    def pixel_loss(
        self, maps: Sequence[torch.Tensor], captions: Sequence[str], metas: Sequence[dict | None]
    ) -> torch.Tensor:
        """L_pixel (a scalar >= 0; 0 when no sample of the batch names an object): TokenCompose's pixel loss
        (Wang et al. 2024, eq. 4), a binary cross-entropy between each word's attention probability at every
        position and its objects' cover of that position, per word whatever `per_word` says,

            L_pixel = -mean_{l, w, p} [ M_w(p) log a_{l,w}(p) + (1 - M_w(p)) log(1 - a_{l,w}(p)) ],

        a_{l,w}(p) = sum_{j in S_w} A_l(p, j), the share of position p's attention that word w's tokens take;
        M_w(p) in [0, 1] the share of p's cell its objects cover. Where L_ground says where a word is read, this
        says what a position reads: an object's positions must take their share from each of its words, the
        colour word included, and none from the other objects' (at best half each for "red" and "star" on
        the red star). Probabilities clamped to [1e-6, 1 - 1e-6] in the logs. maps: as loss's.
        """
        terms = []
        for probs, words, cover in self._batch_targets(maps, captions, metas, True):
            present = cover.sum(dim=2) > 0  # (B, G)
            if not present.any():
                continue
            a = torch.bmm(words, probs.float().transpose(1, 2)).clamp(1e-6, 1 - 1e-6)  # (B, G, positions)
            m = cover.clamp(0, 1)
            bce = -(m * a.log() + (1 - m) * (1 - a).log()).mean(dim=2)  # (B, G)
            terms.append(bce[present].mean())
        return _mean(terms, maps)


def _mean(terms: list[torch.Tensor], maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of a loss's per-map terms; 0 (on the maps' device) when no map had a named object."""
    if not terms:
        return maps[0].new_zeros((), dtype=torch.float32) if maps else torch.zeros(())
    return torch.stack(terms).mean()


def check_grounding_data(info: dict[str, Any], data: str) -> None:
    """Raise ValueError unless the dataset's samples list their objects (the scenes source)."""
    if info.get("source") != "scenes":
        raise ValueError(
            f"grounding > 0 (or grounding_pixel) needs samples whose json lists each object's shape and place, as "
            f"the scenes source's do (`latentdiff data scenes`); {data} is a "
            f"{info.get('source') or 'dataset without a source'!r} dataset: set grounding = 0 and grounding_pixel = 0"
        )
