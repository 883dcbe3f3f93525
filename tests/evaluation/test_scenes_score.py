"""The scenes reader and judge: at its ceiling on real images, near 0 on negative controls, held-out apart."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdiff.data import scenes
from latentdiff.data.scenes import COLORS, CONVERSE, TASKS, parse_caption
from latentdiff.evaluation.scenes import CEILING_GOAL, detect, score, summarize

HOLDOUT = ["blue star", "four rings", "circle above square"]


@pytest.fixture(scope="module")
def real():
    samples = list(scenes.generate_scenes(360, seed=5, resolution=64, holdout=HOLDOUT, split="test"))
    images = np.stack([np.asarray(s.image) for s in samples])  # (N, H, W, 3)
    return samples, images


def test_reader_is_at_its_ceiling_on_real_test_images(real):
    samples, images = real
    captions = [s.caption for s in samples]
    hits = score(images, captions, COLORS)
    summary = summarize(hits, captions, [s.meta["holdout"] for s in samples])
    assert summary["all"]["overall"] >= CEILING_GOAL
    assert all(v >= CEILING_GOAL for v in summary["all"]["tasks"].values()) and len(summary["all"]["tasks"]) == 6
    # it reads the objects themselves, not only the verdict: shapes and colours of a whole-image count
    first = samples[0]
    found = detect(images[0], COLORS)
    assert sorted((d.shape, d.color) for d in found) == sorted((o["shape"], o["color"]) for o in first.meta["objects"])
    # uint8 (N, 3, H, W) tensors and [-1, 1] floats read the same
    t = torch.from_numpy(images[:24]).permute(0, 3, 1, 2)
    assert (score(t, captions[:24], COLORS) == hits[:24]).all()
    assert (score(t.float() / 127.5 - 1, captions[:24], COLORS) == hits[:24]).all()


def _controls(samples, task):
    return [(i, parse_caption(s.caption)) for i, s in enumerate(samples) if s.meta["task"] == task]


def test_negative_controls_score_near_zero(real):
    samples, images = real
    swapped = [(i, replace(p, objects=((p.objects[0][0], p.objects[1][1]), (p.objects[1][0], p.objects[0][1]))))
               for i, p in _controls(samples, "color_attr")]  # fmt: skip
    flipped = [(i, replace(p, relation=CONVERSE[p.relation])) for i, p in _controls(samples, "position")]
    one_more = [(i, replace(p, count=p.count + 1)) for i, p in _controls(samples, "counting")]
    for name, controls in {"color_attr": swapped, "position": flipped, "counting": one_more}.items():
        idx = [i for i, _ in controls]
        assert len(idx) >= 50
        hits = score(images[idx], [p for _, p in controls], COLORS)
        assert hits.mean() <= 0.02, name
        # the same images with their own captions are at the ceiling: the control is what fails
        assert score(images[idx], [samples[i].caption for i in idx], COLORS).mean() >= CEILING_GOAL


def test_black_images_fail_every_task(real):
    samples, images = real
    assert not score(np.zeros_like(images[:30]), [s.caption for s in samples[:30]], COLORS).any()


def test_held_out_prompts_are_reported_apart(real):
    samples, _ = real
    captions = [s.caption for s in samples]
    held = np.array([s.meta["holdout"] for s in samples])
    assert 10 <= held.sum() < len(held)
    summary = summarize(~held, captions, held)  # every seen prompt right, every held-out one wrong
    assert summary["seen"]["overall"] == 1.0 and summary["held_out"]["overall"] == 0.0
    assert sum(summary["held_out"]["n"].values()) == held.sum()
    assert set(summary["held_out"]["tasks"]) <= {"colors", "color_attr", "counting", "position"}
    assert set(summary["all"]["tasks"]) == set(TASKS)


def test_evaluate_reports_scenes_tasks_with_a_stand_in_pipeline(tmp_path: Path, monkeypatch):
    """`latentdiff evaluate` on scenes data: real test images stand in for samples at w=1, black ones at w=5."""
    from types import SimpleNamespace

    from latentdiff.evaluation import evaluate
    from latentdiff.evaluation.images import load_image_set
    from latentdiff.prior import pipeline

    data = tmp_path / "scenes"
    scenes.build(data, 6, val_n=1, test_n=60, seed=2, holdout=HOLDOUT)
    test = load_image_set(data, split="test")

    class StandIn:
        def settings(self, prompts, **kw):
            return SimpleNamespace(
                steps=7, sampler="ddim", precision="fp32", sampler_options={}, guidance_rescale=0.0,
                guidance_interval=None,
                binding=0.0,
                binding_until=0.5,
            )  # fmt: skip

        def __call__(self, prompts, *, guidance, **kw):
            assert list(prompts) == test.captions[: len(prompts)]
            x = test.images[: len(prompts)].float().div(127.5).sub(1)
            return x if guidance <= 1 else torch.full_like(x, -1.0)

    monkeypatch.setattr(pipeline.TextToImage, "from_run", staticmethod(lambda *a, **k: StandIn()))
    report = evaluate.main(
        ["--run", str(tmp_path / "prior"), "--data", str(data), "--n", "60", "--guidance", "1,5",
         "--out", str(tmp_path / "eval")]
    )  # fmt: skip
    w1, w5 = report["results"]
    assert w1["scenes"]["all"]["overall"] == 1.0 and w5["scenes"]["all"]["overall"] == 0.0
    assert report["scenes_ceiling"]["all"]["overall"] == 1.0
    held = sum(m["holdout"] for m in test.metas[:60])
    assert held and sum(w1["scenes"]["held_out"]["n"].values()) == held
    table = (tmp_path / "eval" / "report.md").read_text()
    assert "held-out" in table and "real (ceiling)" in table and "color_attr" in table


def test_shapes_classifier_heads_score_both_objects_of_two_shape_prompts():
    from latentdiff.data import shapes
    from latentdiff.evaluation.classifier import NONE, heads_from_info, targets_from_meta

    heads = heads_from_info({"attributes": shapes.vocabularies()})
    assert heads["second_shape"] == [*shapes.SHAPES, NONE] and heads["shape"] == list(shapes.SHAPES)
    two = {"shapes": [{"shape": "square", "color": "blue", "size": "large", "position": "left"},
                      {"shape": "circle", "color": "red", "size": "small", "position": "right"}]}  # fmt: skip
    one = {"shapes": two["shapes"][:1]}
    t = targets_from_meta(heads, [two, one])
    assert t["second_shape"].tolist() == [shapes.SHAPES.index("circle"), len(shapes.SHAPES)]
    assert t["second_color"].tolist() == [list(shapes.COLORS).index("red"), len(shapes.COLORS)]
    assert t["shape"].tolist() == [shapes.SHAPES.index("square")] * 2
