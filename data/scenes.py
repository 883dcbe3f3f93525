"""Procedural scenes: GenEval's six tasks (Ghosh et al. 2023) on 1 to 4 flat shapes on a black background.

Every image is black with 1 to 4 objects, and its caption describes the whole image from one of
six templates (lowercase, no full stop):

| task | caption | image |
|---|---|---|
| single_object | `a star` | one object, that shape, any colour |
| colors | `a red star` | one object, that shape and colour |
| two_object | `a star and a ring` | two objects of two different shapes |
| counting | `three stars` | that many objects (2 to 4), all that shape, any colours |
| position | `a star to the left of a ring` | two different shapes, first centre >= 0.15 from the second's (below) |
| color_attr | `a red star and a blue ring` | two different shapes, two different colours, each as named |

Position: the first's centre is at least 0.15 of the image from the second's on the relation's
axis, in its direction. Geometry is exact, so a reader can check every image (evaluation/scenes.py does): each shape is
filled at the pixel centres that fall inside it, with no antialiasing, so an object's pixels are
exactly its palette colour. An object's `side` is the width of its bounding box's square (0.22
to 0.375 of the image); its `center` is its bounding box's centre, as GenEval takes a detection's
centre from its box. Objects keep at least GAP of the image between their boxes (4 px at 64 px:
3 background pixels), and the order of mention never tells where an object is.

`holdout` keeps combinations of three kinds out of train: a colour-shape pair ("blue star": no
train image holds a blue star), a count-shape pair ("four rings"), an ordered relation ("circle
above square": no train caption says so, in either wording). Val and test contain them; a
sample whose caption names one is marked `holdout: true`. Tasks are uniform over val and test; over
train too unless `task_weights` gives a train mix (`parse_task_weights`: "position=3,color_attr=3").
Each sample's json also lists `negatives`, two captions of its template that are false for its image
(`hard_negatives`), for contrastive text training with hard negatives.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from latentdiff.data.captions import with_article
from latentdiff.data.shapes import COLORS as SHAPES_COLORS
from latentdiff.data.shapes import split_counts
from latentdiff.data.shards import DEFAULT_MAXCOUNT, SPLITS, Sample, write_info, write_split

SHAPES = ("circle", "square", "triangle", "cross", "star", "ring")
PLURALS = {s: ("crosses" if s == "cross" else f"{s}s") for s in SHAPES}
# The shapes source's six colours plus orange and cyan; every pair is > 90 apart in RGB.
COLORS: dict[str, tuple[int, int, int]] = {**SHAPES_COLORS, "orange": (250, 140, 20), "cyan": (30, 220, 230)}
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS = {2: "two", 3: "three", 4: "four"}
# relation -> (caption words, axis 0 = x / 1 = y, sign of (first centre - second centre)); y grows downwards.
RELATIONS = {
    "left of": ("to the left of", 0, -1),
    "right of": ("to the right of", 0, 1),
    "above": ("above", 1, -1),
    "below": ("below", 1, 1),
}
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SIDE_RANGE = (0.22, 0.375)  # object side as a fraction of the image: 14 to 24 px at 64 px
GAP = 4 / 64  # least space between two objects' boxes, fraction of the image: 3 black pixels at 64 px
MIN_OFFSET = 0.15  # position task: least centre offset on the relation's axis, fraction of the image
# Drawn with this much more offset, in pixels: a star's pixels can put its box centre 1.1 px off (tests/data).
OFFSET_MARGIN_PX = 2.5
HOLDOUT_SHARE = 0.3  # val/test: share of the samples of a task that can name a held-out combination that do
# Bounding box of each shape as fractions of its side (width, height); the others fill their square.
BOX = {"triangle": (1.0, math.sqrt(3) / 2), "star": (math.cos(math.radians(18)), (1 + math.cos(math.radians(36))) / 2)}
STAR_INNER = 0.4  # inner radius of the star over its outer radius
BACKGROUND = (0, 0, 0)


@dataclass(frozen=True)
class SceneObject:
    """One object: its shape, colour and where it is drawn."""

    shape: str  # one of SHAPES
    color: str  # a key of COLORS
    center: tuple[float, float]  # (x, y) of its bounding box's centre, fractions of the image (y down)
    side: float  # side of its square, fraction of the image (its box: BOX times this)


@dataclass(frozen=True)
class Scene:
    """A captioned image: its task, its objects in the order the caption names them, the relation."""

    task: str  # one of TASKS
    objects: tuple[SceneObject, ...]
    relation: str | None = None  # position task: a key of RELATIONS, "first <relation> second"


def box_size(shape: str, side: float) -> tuple[float, float]:
    """(width, height) of a shape's bounding box for `side` (any unit)."""
    w, h = BOX.get(shape, (1.0, 1.0))
    return w * side, h * side


def _star_polygon() -> np.ndarray:
    """(10, 2) vertices of the five-pointed star (one point up), outer radius 1, bounding box centred on 0."""
    angles = np.radians(-90 + 36 * np.arange(10))
    radii = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER)
    pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    return pts - (pts.max(0) + pts.min(0)) / 2


_STAR = _star_polygon()


def _inside_polygon(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule: which points (u, v) lie inside the closed polygon (K, 2)."""
    inside = np.zeros(u.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0)):
        crosses = (y0 > v) != (y1 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def shape_mask(shape: str, center: tuple[float, float], side: float, resolution: int) -> np.ndarray:
    """(R, R) bool: the pixels whose centres lie inside the shape; center (x, y) and side in pixels.

    In units of half the side around the centre (u right, v down): circle u^2+v^2 <= 1; square
    max(|u|, |v|) <= 1; ring 1/4 <= u^2+v^2 <= 1 (a hole half the diameter); cross: a plus with arms
    2/3 wide (one third of the side); triangle: equilateral, point up, side 2; star: five points,
    outer radius 1, inner 0.4.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    half = side / 2
    coords = (np.arange(resolution) + 0.5 - np.array(center)[:, None]) / half  # (2, R)
    u, v = coords[0][None, :], coords[1][:, None]  # broadcast to (R, R): rows are y
    u, v = np.broadcast_arrays(u, v)
    r2 = u**2 + v**2
    if shape == "circle":
        return r2 <= 1
    if shape == "ring":
        return (r2 <= 1) & (r2 >= 0.25)
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 1
    if shape == "cross":
        arm = 1 / 3
        return ((abs(u) <= 1) & (abs(v) <= arm)) | ((abs(v) <= 1) & (abs(u) <= arm))
    if shape == "triangle":
        h = math.sqrt(3) / 2  # half the height, in half-sides
        return (v <= h) & (abs(u) <= (v + h) / math.sqrt(3))
    return _inside_polygon(u, v, _STAR)


def render(objects: Sequence[SceneObject], resolution: int) -> Image.Image:
    """Draw the objects on black, each pixel exactly one palette colour or black (no antialiasing).

    Not the shapes source's PIL drawing: its supersampled, box-filtered edges mix an object's colour
    with the background, and here every pixel must be readable as its object's palette colour.
    """
    canvas = np.zeros((resolution, resolution, 3), dtype=np.uint8)
    for obj in objects:
        mask = shape_mask(obj.shape, (obj.center[0] * resolution, obj.center[1] * resolution), obj.side * resolution,
                          resolution)  # fmt: skip
        canvas[mask] = COLORS[obj.color]
    return Image.fromarray(canvas, "RGB")


# ---- captions ---------------------------------------------------------------------------------------


def _named(obj: SceneObject, color: bool) -> str:
    return with_article(f"{obj.color} {obj.shape}" if color else obj.shape)


def caption_for(scene: Scene) -> str:
    """The caption of a scene from its task's template (table in the module docstring)."""
    objs, task = scene.objects, scene.task
    if task == "single_object":
        return _named(objs[0], False)
    if task == "colors":
        return _named(objs[0], True)
    if task == "two_object":
        return f"{_named(objs[0], False)} and {_named(objs[1], False)}"
    if task == "counting":
        return f"{NUMBERS[len(objs)]} {PLURALS[objs[0].shape]}"
    if task == "position":
        return f"{_named(objs[0], False)} {RELATIONS[scene.relation][0]} {_named(objs[1], False)}"
    if task == "color_attr":
        return f"{_named(objs[0], True)} and {_named(objs[1], True)}"
    raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}")


@dataclass(frozen=True)
class Prompt:
    """What a caption asks for: the task, the named objects (shape, colour or None), a count, a relation."""

    task: str
    objects: tuple[tuple[str, str | None], ...]  # (shape, colour) in the order named; counting: one entry
    count: int = 1  # counting: how many of objects[0]
    relation: str | None = None  # position: "first <relation> second", a key of RELATIONS


_SHAPE = "|".join(SHAPES)
_COLOR = "|".join(COLORS)
_OBJ = rf"an? (?:(?P<c{{i}}>{_COLOR}) )?(?P<s{{i}}>{_SHAPE})"
_REL = "|".join(re.escape(words) for words, _, _ in RELATIONS.values())
_PATTERNS = (
    ("count", re.compile(rf"(?P<n>{'|'.join(NUMBERS.values())}) (?P<p>{'|'.join(PLURALS.values())})")),
    ("position", re.compile(rf"{_OBJ.format(i=0)} (?P<rel>{_REL}) {_OBJ.format(i=1)}")),
    ("pair", re.compile(rf"{_OBJ.format(i=0)} and {_OBJ.format(i=1)}")),
    ("one", re.compile(_OBJ.format(i=0))),
)


def parse_caption(caption: str) -> Prompt:
    """The Prompt a scenes caption states; ValueError for text no template makes ("a star" -> single_object)."""
    text = caption.strip().lower()
    for kind, pattern in _PATTERNS:
        m = pattern.fullmatch(text)
        if not m:
            continue
        if kind == "count":
            n = {w: k for k, w in NUMBERS.items()}[m["n"]]
            return Prompt("counting", ((next(s for s, p in PLURALS.items() if p == m["p"]), None),), count=n)
        first = (m["s0"], m["c0"])
        if kind == "one":
            return Prompt("colors" if m["c0"] else "single_object", (first,))
        second = (m["s1"], m["c1"])
        if (m["c0"] is None) != (m["c1"] is None) or (kind == "position" and m["c0"]):
            break
        if kind == "position":
            rel = next(k for k, (words, _, _) in RELATIONS.items() if words == m["rel"])
            return Prompt("position", (first, second), relation=rel)
        return Prompt("color_attr" if m["c0"] else "two_object", (first, second))
    raise ValueError(
        f"{caption!r} is not a scenes caption; templates: 'a star', 'a red star', 'a star and a ring', "
        "'three stars', 'a star to the left of a ring', 'a red star and a blue ring'"
    )


# ---- held-out combinations -----------------------------------------------------------------------


@dataclass(frozen=True)
class Holdout:
    """A held-out combination: kind "color" (color, shape), "count" (count, shape), "relation" (shape, rel, other)."""

    kind: str
    shape: str
    color: str | None = None
    count: int | None = None
    relation: str | None = None
    other: str | None = None  # the relation's second shape


def parse_holdout(rules: Sequence[str]) -> list[Holdout]:
    """ "blue star", "four rings", "circle above square" (also "circle left of square") -> Holdout; ValueError else."""
    parsed = []
    numbers = {w: k for k, w in NUMBERS.items()}
    plurals = {p: s for s, p in PLURALS.items()}
    for rule in rules:
        words = [w for w in rule.lower().split() if w not in ("a", "an", "the", "to")]
        if len(words) == 2 and words[0] in COLORS and words[1] in SHAPES:
            parsed.append(Holdout("color", words[1], color=words[0]))
        elif len(words) == 2 and words[0] in numbers and words[1] in plurals:
            parsed.append(Holdout("count", plurals[words[1]], count=numbers[words[0]]))
        elif len(words) >= 3 and words[0] in SHAPES and words[-1] in SHAPES and " ".join(words[1:-1]) in RELATIONS:
            if words[0] == words[-1]:
                raise ValueError(f"holdout {rule!r}: a relation holds between two different shapes")
            parsed.append(Holdout("relation", words[0], relation=" ".join(words[1:-1]), other=words[-1]))
        else:
            raise ValueError(
                f"holdout {rule!r}: give a colour and a shape ('blue star'), a count and a shape ('four rings', "
                f"counts {', '.join(NUMBERS.values())}) or 'SHAPE RELATION SHAPE' ('circle above square', relations "
                f"{', '.join(RELATIONS)}); shapes: {', '.join(SHAPES)}; colours: {', '.join(COLORS)}"
            )
    return parsed


def _relation_matches(rule: Holdout, first: str, relation: str, second: str) -> bool:
    return (first, relation, second) == (rule.shape, rule.relation, rule.other) or (
        (second, CONVERSE[relation], first) == (rule.shape, rule.relation, rule.other)
    )


def names_holdout(prompt: Prompt, rules: Sequence[Holdout]) -> bool:
    """True when the prompt names a held-out combination (a relation in either wording)."""
    for rule in rules:
        if rule.kind == "color" and (rule.shape, rule.color) in prompt.objects:
            return True
        if (
            rule.kind == "count"
            and prompt.task == "counting"
            and (prompt.objects[0][0], prompt.count)
            == (
                rule.shape,
                rule.count,
            )
        ):
            return True
        if rule.kind == "relation" and prompt.task == "position":
            if _relation_matches(rule, prompt.objects[0][0], prompt.relation, prompt.objects[1][0]):
                return True
    return False


def contains_holdout(scene: Scene, rules: Sequence[Holdout]) -> bool:
    """True when the image or its caption holds a held-out combination (what train never shows)."""
    if any(r.kind == "color" and (o.shape, o.color) == (r.shape, r.color) for r in rules for o in scene.objects):
        return True
    return names_holdout(prompt_of(scene), rules)


def prompt_of(scene: Scene) -> Prompt:
    """The Prompt the scene's caption states (what parse_caption(caption_for(scene)) returns)."""
    named_colors = scene.task in ("colors", "color_attr")
    objs = tuple((o.shape, o.color if named_colors else None) for o in scene.objects)
    if scene.task == "counting":
        return Prompt("counting", objs[:1], count=len(objs))
    return Prompt(scene.task, objs, relation=scene.relation)


# ---- sampling ---------------------------------------------------------------------------------------


def _attributes(task: str, rng: np.random.Generator, force: Holdout | None) -> tuple[list[tuple[str, str]], str | None]:
    """[(shape, colour)] in the order named, and the relation, for one sample of `task` (`force`d to a rule)."""
    colors = list(COLORS)
    shape = lambda: SHAPES[rng.integers(len(SHAPES))]  # noqa: E731
    color = lambda: colors[rng.integers(len(colors))]  # noqa: E731
    two = list(rng.choice(len(SHAPES), 2, replace=False))
    pair = [SHAPES[two[0]], SHAPES[two[1]]]
    relation = None
    if task in ("single_object", "colors"):
        objs = [(shape(), color())]
    elif task == "counting":
        n = int(rng.integers(2, 5))
        s = shape()
        if force is not None:
            n, s = force.count, force.shape
        objs = [(s, color()) for _ in range(n)]
    elif task == "color_attr":
        cs = list(rng.choice(len(colors), 2, replace=False))
        objs = [(pair[0], colors[cs[0]]), (pair[1], colors[cs[1]])]
    else:
        objs = [(pair[0], color()), (pair[1], color())]
        if task == "position":
            relation = list(RELATIONS)[rng.integers(len(RELATIONS))]
    if force is not None and force.kind == "color":
        slot = int(rng.integers(len(objs)))
        objs[slot] = (force.shape, force.color)
        if len(objs) == 2 and objs[1 - slot][0] == force.shape:  # keep two different shapes
            objs[1 - slot] = (next(s for s in pair + list(SHAPES) if s != force.shape), objs[1 - slot][1])
        if task == "color_attr" and objs[1 - slot][1] == force.color:
            objs[1 - slot] = (objs[1 - slot][0], next(c for c in colors if c != force.color))
    if force is not None and force.kind == "relation":
        objs = [(force.shape, objs[0][1]), (force.other, objs[1][1])]
        relation = force.relation
    return objs, relation


def _place(
    attrs: Sequence[tuple[str, str]], relation: str | None, resolution: int, rng: np.random.Generator
) -> tuple[SceneObject, ...]:
    """Random sides and centres: inside the image, boxes >= GAP apart, the relation true (rejection sampling)."""
    for _ in range(200):
        placed: list[SceneObject] = []
        for shape, color in attrs:
            side = float(rng.uniform(*SIDE_RANGE))
            w, h = box_size(shape, side)
            for _ in range(100):
                c = (float(rng.uniform(w / 2, 1 - w / 2)), float(rng.uniform(h / 2, 1 - h / 2)))
                obj = SceneObject(shape, color, c, side)
                if all(_apart(obj, other) for other in placed):
                    placed.append(obj)
                    break
            else:
                break
        margin = MIN_OFFSET + OFFSET_MARGIN_PX / resolution  # read back from pixels, the offset stays >= MIN_OFFSET
        if len(placed) == len(attrs) and (relation is None or relation_holds(placed[0], placed[1], relation, margin)):
            return tuple(placed)
    raise RuntimeError(f"could not place {attrs} ({relation}) in 200 tries")  # never seen: sizes leave room


def _apart(a: SceneObject, b: SceneObject) -> bool:
    (aw, ah), (bw, bh) = box_size(a.shape, a.side), box_size(b.shape, b.side)
    gap_x = abs(a.center[0] - b.center[0]) - (aw + bw) / 2
    gap_y = abs(a.center[1] - b.center[1]) - (ah + bh) / 2
    return max(gap_x, gap_y) >= GAP


def relation_holds(first: Any, second: Any, relation: str, min_offset: float = MIN_OFFSET) -> bool:
    """The position rule: first's centre >= min_offset (fraction of the image) from second's on the relation's axis.

    first, second: anything with `.center` (x, y) as fractions of the image, y down.
    """
    _, axis, sign = RELATIONS[relation]
    return sign * (first.center[axis] - second.center[axis]) >= min_offset


def sample_scene(
    rng: np.random.Generator, resolution: int, task: str, rules: Sequence[Holdout] = (), train: bool = True
) -> Scene:
    """One scene of `task`. train: never a held-out combination; else HOLDOUT_SHARE of those that can name one do."""
    force = None
    if not train:
        fits = [r for r in rules if _fits(r, task)]
        if fits and rng.random() < HOLDOUT_SHARE:
            force = fits[int(rng.integers(len(fits)))]
    for _ in range(1000):
        attrs, relation = _attributes(task, rng, force)
        scene = Scene(task, _place(attrs, relation, resolution, rng), relation)
        if not train or not contains_holdout(scene, rules):
            return scene
    raise ValueError(f"holdout {rules} leaves no {task} scene possible; hold out less")


def _fits(rule: Holdout, task: str) -> bool:
    return {"color": task in ("colors", "color_attr"), "count": task == "counting", "relation": task == "position"}[
        rule.kind
    ]


def hard_negatives(scene: Scene, rules: Sequence[Holdout], rng: np.random.Generator) -> list[str]:
    """Two captions of the scene's template that are false for its image, the nearest kind of wrong per task.

    For contrastive text training with hard negatives (NegCLIP, Yuksekgonul et al. 2023, Sec. 4): a CLIP
    trained on batches alone can tell "a red star and a blue ring" from "a red ring and a blue star" no
    better than a bag of words, because no batch makes it. Per task:
    single_object: two other shapes; colors: another colour, another shape; two_object: either shape
    replaced by one not drawn; counting: the two other counts; position: the relation flipped, the two
    shapes swapped; color_attr: the colours swapped, the first colour replaced by a third.
    A negative that names a held-out combination is left out (train never names one), so a list can be shorter.
    """
    objs, task = scene.objects, scene.task
    others = lambda taken, pool: [x for x in pool if x not in taken]  # noqa: E731
    pick = lambda pool: pool[int(rng.integers(len(pool)))]  # noqa: E731

    first = objs[0]
    if task == "single_object":
        two = rng.choice(others([first.shape], SHAPES), 2, replace=False)
        wrong = [Scene(task, (replace(first, shape=str(s)),)) for s in two]
    elif task == "colors":
        wrong = [
            Scene(task, (replace(first, color=pick(others([first.color], list(COLORS)))),)),
            Scene(task, (replace(first, shape=pick(others([first.shape], SHAPES))),)),
        ]
    elif task == "two_object":
        free = others([o.shape for o in objs], SHAPES)
        wrong = [
            Scene(task, (replace(objs[0], shape=pick(free)), objs[1])),
            Scene(task, (objs[0], replace(objs[1], shape=pick(free)))),
        ]
    elif task == "counting":
        wrong = [Scene(task, (first,) * n) for n in NUMBERS if n != len(objs)]
    elif task == "position":
        wrong = [Scene(task, objs, CONVERSE[scene.relation]), Scene(task, objs[::-1], scene.relation)]
    elif task == "color_attr":
        third = pick(others([o.color for o in objs], list(COLORS)))
        wrong = [
            Scene(task, (replace(objs[0], color=objs[1].color), replace(objs[1], color=objs[0].color))),
            Scene(task, (replace(objs[0], color=third), objs[1])),
        ]
    else:
        raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}")
    return [caption_for(w) for w in wrong if not names_holdout(prompt_of(w), rules)]


def scene_meta(scene: Scene, rules: Sequence[Holdout], negatives: Sequence[str] = ()) -> dict[str, Any]:
    """The sample's json: task, objects (shape, color, center (x, y) and side as fractions), relation, holdout,
    and the hard-negative captions (`hard_negatives`)."""
    return {
        "source": "scenes",
        "task": scene.task,
        "objects": [
            # unrounded, so the json redraws the exact pixels
            {"shape": o.shape, "color": o.color, "center": list(o.center), "side": o.side}
            for o in scene.objects
        ],
        "relation": scene.relation,
        "holdout": names_holdout(prompt_of(scene), rules),
        "negatives": list(negatives),
    }


def parse_task_weights(text: str) -> dict[str, int]:
    """The train mix from "position=3,color_attr=3": each task's weight (unnamed ones 1); raises ValueError.

    A weight is a whole number >= 0 (0: the task is never trained, still tested); at least one is > 0.
    """
    weights = dict.fromkeys(TASKS, 1)
    for item in filter(None, (part.strip() for part in text.split(","))):
        task, _, value = item.partition("=")
        task = task.strip()
        if task not in weights or not value.strip().isdigit():
            names = ", ".join(TASKS)
            raise ValueError(f"task weights are TASK=N, N a whole number >= 0 and TASK one of {names}; got {item!r}")
        weights[task] = int(value)
    if not any(weights.values()):
        raise ValueError(f"task weights {text!r} leave no task to train")
    return weights


def generate_scenes(
    n: int,
    seed: int = 0,
    resolution: int = 64,
    holdout: Sequence[str] = (),
    split: str = "train",
    task_weights: dict[str, int] | None = None,
) -> Iterator[Sample]:
    """`n` samples of `split`, a pure function of (seed, split, task_weights).

    Tasks come in blocks, each a seeded shuffle of every task once (uniform), or in train of every task as many
    times as `task_weights` gives (`parse_task_weights`; val and test stay uniform, as GenEval's prompts are).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0 or resolution < 16:
        raise ValueError(f"need n >= 0 and resolution >= 16, got n={n}, resolution={resolution}")
    rules = parse_holdout(holdout)
    weights = task_weights if split == "train" and task_weights else dict.fromkeys(TASKS, 1)
    block = [task for task in TASKS for _ in range(weights.get(task, 0))]
    if not block or set(weights) - set(TASKS):
        raise ValueError(f"task weights name the tasks {', '.join(TASKS)}, one > 0; got {weights}")
    rng = np.random.default_rng([seed % 2**63, SPLITS.index(split), 32])
    negatives_rng = np.random.default_rng([seed % 2**63, SPLITS.index(split), 33])  # apart: images stay as they were
    order: list[int] = []
    for i in range(n):
        if not order:  # every block holds each task its weight's times: the mix holds over any split's length
            order = list(rng.permutation(len(block)))
        scene = sample_scene(rng, resolution, block[order.pop()], rules, train=split == "train")
        yield Sample(
            key=f"{split}_{i:08d}",
            image=render(scene.objects, resolution),
            caption=caption_for(scene),
            meta=scene_meta(scene, rules, hard_negatives(scene, rules, negatives_rng)),
        )


def build(
    out_dir: str | os.PathLike,
    n: int,
    val_n: int | None = None,
    test_n: int | None = None,
    seed: int = 0,
    resolution: int = 64,
    holdout: Sequence[str] = (),
    maxcount: int = DEFAULT_MAXCOUNT,
    progress: bool = False,
    task_weights: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Write train (n), val and test (default n // 10 each, at least 1) shards and info.json (with the palette,
    and the train mix when `task_weights` gives one)."""
    parse_holdout(holdout)  # fail before writing anything
    counts = split_counts(n, val_n, test_n, resolution, min_resolution=16)
    for split, count in counts.items():
        samples = generate_scenes(count, seed, resolution, holdout, split, task_weights)
        counts[split] = write_split(out_dir, split, samples, maxcount=maxcount, progress="scenes" if progress else "",
                                    total=count)  # fmt: skip
    return write_info(
        out_dir,
        source="scenes",
        resolution=resolution,
        splits=counts,
        tasks=list(TASKS),
        shapes=list(SHAPES),
        palette={name: list(rgb) for name, rgb in COLORS.items()},
        holdout=list(holdout),
        task_weights=dict(task_weights or dict.fromkeys(TASKS, 1)),  # the train mix; val and test are uniform
        seed=seed,
        skipped=0,
    )
