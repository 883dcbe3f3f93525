"""bench.attributes: colours and colour binding read on real scenes, and their negative controls."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bench import attributes
from latentdiff.data.scenes import COLORS, SHAPES, caption_for, parse_caption, render, sample_scene


def _scenes(task: str, n: int = 24):
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, 64, task) for _ in range(n)]
    images = torch.stack([torch.from_numpy(np.array(render(s.objects, 64))).permute(2, 0, 1) for s in scenes])
    return scenes, images


def _recoloured(scene, colours):
    """The scene's caption with its objects' colours replaced by `colours` (shapes and places unchanged)."""
    objects = tuple(dataclasses.replace(o, color=c) for o, c in zip(scene.objects, colours))
    return caption_for(dataclasses.replace(scene, objects=objects))


def test_real_colour_scenes_are_right_and_other_colours_are_not():
    scenes, images = _scenes("colors")
    captions = [caption_for(s) for s in scenes]
    true = attributes.colour_summary(attributes.drawn_colours(images, captions, COLORS), captions)
    assert true["found"] == 1.0 and true["right"] == 1.0
    names = list(COLORS)
    other = [_recoloured(s, [names[(names.index(s.objects[0].color) + 1) % len(names)]]) for s in scenes]
    wrong = attributes.colour_summary(attributes.drawn_colours(images, other, COLORS), other)
    assert wrong["found"] == 1.0 and wrong["right"] == 0.0
    # the confusion says what was drawn instead: each asked colour's row holds the scenes' real colours
    for s, caption in zip(scenes, other):
        asked = parse_caption(caption).objects[0][1]
        assert wrong["confusion"][asked].get(s.objects[0].color, 0) > 0


def test_real_attribution_scenes_are_right_swapped_captions_swapped():
    scenes, images = _scenes("color_attr")
    captions = [caption_for(s) for s in scenes]
    true = attributes.attribution_summary(attributes.drawn_colours(images, captions, COLORS), captions)
    assert true["both_found"] == 1.0 and true["right"] == 1.0 and true["same_colour"] == 0.0
    swapped = [_recoloured(s, [s.objects[1].color, s.objects[0].color]) for s in scenes]
    flipped = attributes.attribution_summary(attributes.drawn_colours(images, swapped, COLORS), swapped)
    assert flipped["swapped"] == 1.0 and flipped["right"] == 0.0
    # a shape the image lacks: not found, so no outcome
    absent = [next(x for x in SHAPES if x not in {o.shape for o in s.objects}) for s in scenes]
    missing = [
        _recoloured(dataclasses.replace(s, objects=(s.objects[0], dataclasses.replace(s.objects[1], shape=x))),
                    [o.color for o in s.objects])
        for x, s in zip(absent, scenes)
    ]  # fmt: skip
    assert attributes.attribution_summary(attributes.drawn_colours(images, missing, COLORS), missing)["both_found"] == 0


def test_attribution_outcomes():
    outcome = attributes.attribution_outcome
    assert outcome(("red", "blue"), ("red", "blue")) == "right"
    assert outcome(("red", "blue"), ("blue", "red")) == "swapped"
    assert outcome(("red", "blue"), ("red", "red")) == "first only"
    assert outcome(("red", "blue"), ("blue", "blue")) == "second only"
    assert outcome(("red", "blue"), ("green", "cyan")) == "neither"


def test_captions_cover_every_colour_shape_and_ordered_shape_pair():
    colours = attributes.colour_captions()
    assert len(colours) == len(set(colours)) == len(COLORS) * len(SHAPES)
    assert "a red star" in colours and "an orange ring" in colours
    pairs = attributes.attribution_captions(pairs=4, seed=1)
    assert len(pairs) == len(set(pairs)) == 6 * 5 * 4
    assert {parse_caption(c).task for c in pairs} == {"color_attr"}
    assert pairs == attributes.attribution_captions(pairs=4, seed=1) != attributes.attribution_captions(4, seed=2)
    for bad in (0, 57):
        with pytest.raises(ValueError, match="1 to 56"):
            attributes.attribution_captions(pairs=bad)


def test_main_on_a_kept_checkpoint_of_a_prior(prior_run, tmp_path):
    from latentdiff.data import scenes

    data = tmp_path / "scenes"  # the palette's source
    scenes.build(data, 4, val_n=2, test_n=2, seed=0, resolution=32)
    step = prior_run[1]["steps"]
    args = ["--prior", str(prior_run[0]), "--data", str(data), "--steps", "1", "--guidance", "1", "--n", "1"]
    figures = attributes.main([*args, "--pairs", "1", "--checkpoint", str(step), "--out", str(tmp_path / "a.json")])
    assert figures["checkpoint"] == step
    assert figures["colors"]["images"] == 48 and figures["color_attr"]["images"] == 30
    assert set(figures["colors"]["confusion"]) == set(COLORS)
    with pytest.raises(SystemExit):  # refused in one line before anything is loaded
        attributes.main([*args, "--pairs", "57"])
