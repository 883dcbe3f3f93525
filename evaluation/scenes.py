"""Scoring scenes (data/scenes.py) the way GenEval (Ghosh et al. 2023) scores its six tasks.

A geometric reader stands in for GenEval's object detector, chosen over a trained classifier
because the scenes' geometry is exact: on real test images it reads every object right (its
ceiling, measured by `ceiling` and reported beside every score), needs no training run, and costs
milliseconds per image.

1. Segment: pixels whose brightest channel exceeds FOREGROUND are objects (every palette colour
   has a channel >= 190; the background is black); 8-connected components smaller than
   MIN_AREA of the image are specks and ignored.
2. Shape: each component's bounding box fixes, per shape, a side and a centre; the shape's exact
   mask (data.scenes.shape_mask) drawn there is compared with the component, and the shape with
   the highest IoU names it.
3. Colour: the palette entry nearest (RGB distance) to the component's median colour.
4. Centre: the bounding box's centre, as GenEval takes a detection's centre from its box.

Judging a prompt (GenEval's `evaluate`): every named shape must be found; counting needs exactly
that many (GenEval's include count N plus exclude count N + 1); colors and color_attr need the
largest object of each named shape (GenEval checks its top detection) in its named colour;
position needs the largest first-named object's centre >= 0.15 of the image from the largest
second-named one's on the relation's axis, in its direction (the rule the scenes are drawn by;
GenEval's own rule adds a margin of 0.1 of the boxes' sizes and needs the direction to dominate).
The overall score is the mean over the six tasks, as GenEval reports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from latentdiff.data.scenes import SHAPES, TASKS, Prompt, box_size, parse_caption, relation_holds, shape_mask

FOREGROUND = 80  # a pixel is an object's when its brightest channel exceeds this (0-255)
CEILING_GOAL = 0.97  # the reader must score at least this on real test images (issue #32)
MIN_AREA = 0.004  # components under this fraction of the image are specks (16 px at 64 px; the least object: 58)
_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity: a star's thin points stay one component


@dataclass(frozen=True)
class Detection:
    """One object the reader found."""

    shape: str  # one of SHAPES: the best-matching template
    color: str  # nearest palette name
    center: tuple[float, float]  # (x, y) of its bounding box's centre, fractions of the image
    area: int  # pixels
    iou: float  # IoU of the component with the named shape's template, in [0, 1]


def _shape_of(mask: np.ndarray) -> tuple[str, float]:
    """(best shape, its IoU) for one component `mask` (h, w) cropped to its bounding box."""
    h, w = mask.shape
    pad = 2
    size = max(h, w) + 2 * pad
    crop = np.zeros((size, size), dtype=bool)
    crop[pad : pad + h, pad : pad + w] = mask
    center = (pad + w / 2, pad + h / 2)
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        wr, hr = box_size(shape, 1.0)
        side = (w / wr + h / hr) / 2  # pixel-centre sampling shrinks a box by up to a pixel: the mean of both
        template = shape_mask(shape, center, side, size)
        union = np.count_nonzero(template | crop)
        iou = np.count_nonzero(template & crop) / union if union else 0.0
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


def detect(image: np.ndarray, palette: dict[str, Sequence[int]]) -> list[Detection]:
    """The objects in one image (H, W, 3) uint8, largest first; palette: name -> (r, g, b) (info.json's)."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    height, width = image.shape[:2]
    foreground = image.max(axis=-1) > FOREGROUND
    labels, count = ndimage.label(foreground, structure=_EIGHT)
    names = list(palette)
    rgb = np.array([palette[n] for n in names], dtype=np.float64)  # (K, 3)
    found = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        mask = labels[box] == index
        area = int(mask.sum())
        if area < MIN_AREA * height * width:
            continue
        shape, iou = _shape_of(mask)
        median = np.median(image[box][mask].astype(np.float64), axis=0)  # (3,)
        color = names[int(np.argmin(((rgb - median) ** 2).sum(-1)))]
        ys, xs = box
        center = ((xs.start + xs.stop) / 2 / width, (ys.start + ys.stop) / 2 / height)
        found.append(Detection(shape, color, center, area, iou))
    return sorted(found, key=lambda d: -d.area)


def judge(prompt: Prompt, found: Sequence[Detection]) -> bool:
    """Whether the detections show what the prompt asks (module docstring: GenEval's rules)."""
    by_shape: dict[str, list[Detection]] = {}
    for d in found:  # largest first within each shape
        by_shape.setdefault(d.shape, []).append(d)
    named = [by_shape.get(shape, []) for shape, _ in prompt.objects]
    if prompt.task == "counting":
        return len(named[0]) == prompt.count
    if any(not group for group in named):
        return False
    if any(color is not None and group[0].color != color for (_, color), group in zip(prompt.objects, named)):
        return False
    if prompt.relation is not None:
        return relation_holds(named[0][0], named[1][0], prompt.relation)
    return True


def _to_hwc(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, 3, H, W) uint8 tensor, or float in [-1, 1], -> (N, H, W, 3) uint8 array."""
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        images = images.permute(0, 2, 3, 1).cpu().numpy()
    return np.asarray(images)


def score(
    images: torch.Tensor | np.ndarray, prompts: Sequence[Prompt | str], palette: dict[str, Sequence[int]]
) -> np.ndarray:
    """(N,) bool: whether each image (N, 3, H, W) shows its prompt (a Prompt or a scenes caption)."""
    arrays = _to_hwc(images)
    if len(arrays) != len(prompts):
        raise ValueError(f"{len(arrays)} images but {len(prompts)} prompts")
    parsed = [p if isinstance(p, Prompt) else parse_caption(p) for p in prompts]
    return np.array([judge(p, detect(image, palette)) for p, image in zip(parsed, arrays)], dtype=bool)


def summarize(hits: Sequence[bool], prompts: Sequence[Prompt | str], holdout: Sequence[bool]) -> dict[str, Any]:
    """Per task and overall (mean over the tasks present), for "seen", "held_out" and "all" prompts.

    Returns {"seen": {"tasks": {task: share}, "overall": share, "n": {task: count}}, "held_out": ..., "all": ...};
    a group without prompts has overall None.
    """
    tasks = [(p if isinstance(p, Prompt) else parse_caption(p)).task for p in prompts]
    hits, holdout = np.asarray(hits, dtype=bool), np.asarray(holdout, dtype=bool)
    groups = {"seen": ~holdout, "held_out": holdout, "all": np.ones_like(holdout)}
    out: dict[str, Any] = {}
    for name, keep in groups.items():
        per = {}
        counts = {}
        for task in TASKS:
            sel = keep & (np.array(tasks) == task)
            if sel.any():
                per[task] = float(hits[sel].mean())
                counts[task] = int(sel.sum())
        out[name] = {"tasks": per, "overall": float(np.mean(list(per.values()))) if per else None, "n": counts}
    return out


def ceiling(real_images: torch.Tensor, captions: Sequence[str], palette: dict[str, Sequence[int]],
            holdout: Sequence[bool]) -> dict[str, Any]:  # fmt: skip
    """The reader's accuracy on real images scored against their own captions: summarize()'s dict."""
    return summarize(score(real_images, captions, palette), captions, holdout)


def holdout_flags(metas: Sequence[dict[str, Any]]) -> list[bool]:
    """Each sample's json "holdout" (False where absent)."""
    return [bool(m.get("holdout", False)) for m in metas]


def _cell(summary: dict[str, Any], key: str | None) -> str:
    value = summary["overall"] if key is None else summary["tasks"].get(key)
    return "-" if value is None else f"{value:.2f}"


def scenes_table(rows: Sequence[dict[str, Any]], ceiling_summary: dict[str, Any]) -> str:
    """Markdown: per guidance value, seen and held-out rows of the six tasks and overall, then the ceiling.

    rows: {"guidance": w, "scenes": summarize()'s dict}.
    """
    cols = ["guidance", "prompts", *TASKS, "overall"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        for group in ("seen", "held_out"):
            s = row["scenes"][group]
            if s["overall"] is None:
                continue
            n = sum(s["n"].values())
            cells = [_cell(s, t) for t in TASKS] + [_cell(s, None)]
            lines.append(f"| {row['guidance']:g} | {group.replace('_', '-')} ({n}) | " + " | ".join(cells) + " |")
    for group in ("seen", "held_out"):
        s = ceiling_summary[group]
        if s["overall"] is not None:
            cells = [_cell(s, t) for t in TASKS] + [_cell(s, None)]
            lines.append(f"| real (ceiling) | {group.replace('_', '-')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
