"""Procedural shapes: one or two coloured shapes on a black background, captioned from their attributes.

Every caption is a function of the attributes stored in the json ("a large red circle on the
left"; two shapes: "a small blue square on the left and a large yellow triangle on the right"),
so a generated image can be scored for faithfulness to its prompt. `holdout` keeps chosen
combinations ("blue triangle", or a single value such as "triangle") out of train while val and
test still contain them, to measure compositional generalisation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from latentdiff.data.captions import with_article
from latentdiff.data.shards import DEFAULT_MAXCOUNT, SPLITS, Sample, write_info, write_split

SHAPES = ("circle", "square", "triangle", "cross")
# Well separated in RGB and all bright against the black background.
COLORS = {
    "red": (230, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 90, 255),
    "yellow": (250, 225, 30),
    "purple": (170, 50, 220),
    "white": (240, 240, 240),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
BACKGROUND = (0, 0, 0)
SUPERSAMPLE = 4  # draw at 4x and box-filter down, which antialiases the edges
# Shape side as a fraction of the image: (one shape, each of two shapes side by side).
SIZE_FRACTIONS = {"small": (0.28, 0.24), "large": (0.5, 0.4)}
# Centre of a single shape at each position, as fractions of the image (x, y).
CENTERS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5)}
JITTER = 1 / 20  # random shift of each centre, as a fraction of the image
TWO_SHAPE_PROB = 0.5
GAP = 1 / 32  # half the minimum space between two shapes, so they never touch


@dataclass(frozen=True)
class Shape:
    """The attributes of one shape in an image."""

    shape: str  # one of SHAPES
    color: str  # a key of COLORS
    size: str  # one of SIZES
    position: str  # one of POSITIONS


def vocabularies() -> dict[str, list[str]]:
    """Every attribute and its values, as recorded in info.json."""
    return {"shape": list(SHAPES), "color": list(COLORS), "size": list(SIZES), "position": list(POSITIONS)}


def describe(shape: Shape) -> str:
    """ "a large red circle on the left"."""
    return f"{with_article(f'{shape.size} {shape.color} {shape.shape}')} {POSITION_PHRASES[shape.position]}"


def caption_for(shapes: Sequence[Shape]) -> str:
    """Caption of an image from its shapes, joined with "and" in left-to-right order."""
    if not shapes:
        raise ValueError("an image needs at least one shape")
    return " and ".join(describe(s) for s in shapes)


def parse_holdout(rules: Sequence[str]) -> list[dict[str, str]]:
    """ "blue triangle" -> {"color": "blue", "shape": "triangle"}; any attribute values may be combined."""
    owner = {value: attr for attr, values in vocabularies().items() for value in values}
    parsed = []
    for rule in rules:
        words = rule.lower().split()
        if not words:
            raise ValueError("an empty holdout rule would hold out everything; give e.g. 'blue triangle'")
        combo: dict[str, str] = {}
        for word in words:
            if word not in owner:
                raise ValueError(
                    f"holdout {rule!r}: unknown word {word!r}; use values of "
                    + "; ".join(f"{a}: {', '.join(v)}" for a, v in vocabularies().items())
                )
            if owner[word] in combo:
                raise ValueError(f"holdout {rule!r} names two values of {owner[word]}; one can never match")
            combo[owner[word]] = word
        parsed.append(combo)
    return parsed


def is_held_out(shape: Shape, rules: Sequence[dict[str, str]]) -> bool:
    """True when `shape` matches every attribute of any one rule."""
    attrs = asdict(shape)
    return any(all(attrs[k] == v for k, v in rule.items()) for rule in rules)


def _sample_shape(rng: np.random.Generator, position: str, rules: Sequence[dict[str, str]]) -> Shape:
    # Rejection per shape: cheap, and feasibility is checked once up front by `_check_feasible`.
    while True:
        shape = Shape(
            shape=SHAPES[rng.integers(len(SHAPES))],
            color=list(COLORS)[rng.integers(len(COLORS))],
            size=SIZES[rng.integers(len(SIZES))],
            position=position,
        )
        if not is_held_out(shape, rules):
            return shape


def _check_feasible(rules: Sequence[dict[str, str]]) -> None:
    for position in ("left", "right"):  # both positions of two-shape images must stay possible
        if all(is_held_out(Shape(s, c, z, position), rules) for s in SHAPES for c in COLORS for z in SIZES):
            raise ValueError(f"holdout {rules} excludes every shape at position {position!r}; hold out less")


def sample_attributes(rng: np.random.Generator, rules: Sequence[dict[str, str]] = ()) -> list[Shape]:
    """One or two shapes; two shapes always sit left and right, in that order."""
    if rng.random() < TWO_SHAPE_PROB:
        return [_sample_shape(rng, "left", rules), _sample_shape(rng, "right", rules)]
    for _ in range(1000):
        position = POSITIONS[rng.integers(len(POSITIONS))]
        if any(not is_held_out(Shape(s, c, z, position), rules) for s in SHAPES for c in COLORS for z in SIZES):
            return [_sample_shape(rng, position, rules)]
    raise ValueError(f"holdout {rules} leaves no single-shape image possible")


def _polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    h = side / 2
    if shape == "triangle":  # equilateral, pointing up, centred on its bounding box
        height = side * math.sqrt(3) / 2
        return [(cx, cy - height / 2), (cx + h, cy + height / 2), (cx - h, cy + height / 2)]
    if shape == "cross":  # a plus sign with arms one third of the side thick
        t = side / 6
        return [
            (cx - t, cy - h), (cx + t, cy - h), (cx + t, cy - t), (cx + h, cy - t),
            (cx + h, cy + t), (cx + t, cy + t), (cx + t, cy + h), (cx - t, cy + h),
            (cx - t, cy + t), (cx - h, cy + t), (cx - h, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    return None


def render(shapes: Sequence[Shape], resolution: int = 32, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw `shapes` at SUPERSAMPLE x `resolution` and downsample; `rng` jitters the centres."""
    big = resolution * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    two = len(shapes) == 2
    for s in shapes:
        side = SIZE_FRACTIONS[s.size][1 if two else 0] * big
        fx, fy = CENTERS[s.position]
        if rng is not None:
            fx, fy = fx + rng.uniform(-JITTER, JITTER), fy + rng.uniform(-JITTER, JITTER)
        # Keep the whole shape inside the image and, with two shapes, inside its own half.
        if not two:
            lo_x, hi_x = 0.0, big
        elif s.position == "left":
            lo_x, hi_x = 0.0, big / 2 - GAP * big
        else:
            lo_x, hi_x = big / 2 + GAP * big, big
        cx = min(max(fx * big, lo_x + side / 2), hi_x - side / 2)
        cy = min(max(fy * big, side / 2), big - side / 2)
        color = COLORS[s.color]
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        if s.shape == "circle":
            draw.ellipse(box, fill=color)
        elif s.shape == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon(_polygon(s.shape, cx, cy, side), fill=color)
    return canvas.resize((resolution, resolution), Image.Resampling.BOX)


def generate_shapes(
    n: int,
    seed: int = 0,
    resolution: int = 32,
    holdout: Sequence[str] = (),
    split: str = "train",
) -> Iterator[Sample]:
    """`n` samples of `split`, a pure function of (seed, split); held-out combinations only leave train."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0 or resolution < 4:
        raise ValueError(f"need n >= 0 and resolution >= 4, got n={n}, resolution={resolution}")
    rules = parse_holdout(holdout) if split == "train" else []
    _check_feasible(rules)
    rng = np.random.default_rng([seed % 2**63, SPLITS.index(split)])
    for i in range(n):
        shapes = sample_attributes(rng, rules)
        yield Sample(
            key=f"{split}_{i:08d}",
            image=render(shapes, resolution, rng),
            caption=caption_for(shapes),
            meta={
                "shapes": [asdict(s) for s in shapes],
                "source": "shapes",
                "label": SHAPES.index(shapes[0].shape),
                "class": shapes[0].shape,
            },
        )


def split_counts(n: int, val_n: int | None, test_n: int | None, resolution: int, min_resolution: int) -> dict[str, int]:
    """{"train": n, "val", "test"} of a procedural source (val and test default to n // 10, at least 1).

    Raises ValueError for a negative count or a resolution under `min_resolution` (the source's smallest).
    """
    if min(n, val_n or 0, test_n or 0) < 0 or resolution < min_resolution:
        raise ValueError(
            f"need counts >= 0 and resolution >= {min_resolution}, got n={n}, val_n={val_n}, test_n={test_n}, "
            f"resolution={resolution}"
        )
    default_eval = max(1, n // 10)
    return {
        "train": n,
        "val": default_eval if val_n is None else val_n,
        "test": default_eval if test_n is None else test_n,
    }


def build(
    out_dir: str | os.PathLike,
    n: int,
    val_n: int | None = None,
    test_n: int | None = None,
    seed: int = 0,
    resolution: int = 32,
    holdout: Sequence[str] = (),
    maxcount: int = DEFAULT_MAXCOUNT,
    progress: bool = False,
) -> dict[str, Any]:
    """Write train (n), val and test (default n // 10 each, at least 1) shards and info.json."""
    parse_holdout(holdout)  # fail before writing anything
    counts = split_counts(n, val_n, test_n, resolution, min_resolution=4)
    for split, count in counts.items():
        samples = generate_shapes(count, seed, resolution, holdout, split)
        label = "shapes" if progress else ""
        counts[split] = write_split(out_dir, split, samples, maxcount=maxcount, progress=label, total=count)
    return write_info(
        out_dir,
        source="shapes",
        resolution=resolution,
        splits=counts,
        classes=list(SHAPES),
        attributes=vocabularies(),
        holdout=list(holdout),
        seed=seed,
        skipped=0,
    )
