"""bench.counting: how many objects are drawn for a count, read on real scenes, and its negative controls."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bench import counting
from latentdiff.data.scenes import COLORS, NUMBERS, PLURALS, SHAPES, caption_for, render
from tests.helpers import rendered_scenes


def test_real_counting_scenes_are_right_and_other_counts_are_not():
    scenes, images = rendered_scenes("counting", 36)
    drawn = counting.drawn_shapes(images, COLORS)
    captions = [caption_for(s) for s in scenes]
    summary = counting.counting_summary(drawn, captions)
    assert sum(c["images"] for c in summary.values()) == len(scenes)
    for k, c in summary.items():
        if c["images"]:
            assert c["right"] == 1.0 and c["drawn"] == {int(k): c["images"]} and c["other_shape"] == 0.0
    # Negative control: each scene asked for one object more (four scenes asked for two): right 0.
    more = [f"{NUMBERS[{2: 3, 3: 4, 4: 2}[len(s.objects)]]} {PLURALS[s.objects[0].shape]}" for s in scenes]
    assert all(c["right"] == 0.0 for c in counting.counting_summary(drawn, more).values() if c["images"])
    # Asked for another shape: right 0, and every object drawn is of another shape.
    other = [f"{NUMBERS[len(s.objects)]} {PLURALS[SHAPES[(SHAPES.index(s.objects[0].shape) + 1) % 6]]}" for s in scenes]
    for c in counting.counting_summary(drawn, other).values():
        assert c["right"] == 0.0 and c["other_shape"] == 1.0


def test_one_object_of_another_shape_is_counted_but_not_right():
    scenes, _ = rendered_scenes("counting", 12)
    scene = scenes[0]
    odd = SHAPES[(SHAPES.index(scene.objects[0].shape) + 1) % 6]
    objects = (dataclasses.replace(scene.objects[0], shape=odd), *scene.objects[1:])
    image = torch.from_numpy(np.array(render(objects, 64))).permute(2, 0, 1)[None]
    drawn = counting.drawn_shapes(image, COLORS)
    c = counting.counting_summary(drawn, [caption_for(scene)])[str(len(scene.objects))]
    assert c["right"] == 0.0 and c["drawn"] == {len(scene.objects): 1}
    assert c["other_shape"] == pytest.approx(1 / len(scene.objects), abs=1e-3)


def test_captions_cover_every_count_and_shape_and_refusals():
    captions = counting.counting_captions()
    assert len(captions) == len(set(captions)) == 18 and "three stars" in captions and "two crosses" in captions
    with pytest.raises(ValueError, match="not a counting caption"):
        counting.counting_summary([[]], ["a star"])
    with pytest.raises(ValueError, match="1 images but 2 captions"):
        counting.counting_summary([[]], ["two stars", "three stars"])


def test_main_on_a_kept_checkpoint_of_a_prior(prior_run, tmp_path):
    from latentdiff.data import scenes

    data = tmp_path / "scenes"  # the palette's source
    scenes.build(data, 4, val_n=2, test_n=2, seed=0, resolution=32)
    step = prior_run[1]["steps"]
    args = ["--prior", str(prior_run[0]), "--data", str(data), "--steps", "1", "--guidance", "1", "--n", "1"]
    figures = counting.main([*args, "--checkpoint", str(step), "--out", str(tmp_path / "c.json")])
    assert figures["checkpoint"] == step and sorted(figures["counts"]) == ["2", "3", "4"]
    assert all(c["images"] == 6 and sum(c["drawn"].values()) == 6 for c in figures["counts"].values())
    with pytest.raises(SystemExit):  # refused in one line before anything is loaded
        counting.main([*args, "--n", "0"])
