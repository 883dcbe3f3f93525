"""bench.attributes: colours and colour binding read on real scenes, and their negative controls."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench import attributes
from latentdiff.data.scenes import COLORS, SHAPES, caption_for, parse_caption, scene_meta
from tests.helpers import rendered_scenes


def _recoloured(scene, colours):
    """The scene's caption with its objects' colours replaced by `colours` (shapes and places unchanged)."""
    objects = tuple(dataclasses.replace(o, color=c) for o, c in zip(scene.objects, colours))
    return caption_for(dataclasses.replace(scene, objects=objects))


def test_real_colour_scenes_are_right_and_other_colours_are_not():
    scenes, images = rendered_scenes("colors")
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
    scenes, images = rendered_scenes("color_attr")
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


def test_reading_shares_say_which_words_each_object_is_read_from():
    from open_clip import SimpleTokenizer

    from latentdiff.prior.grounding import word_token_positions

    tokenizer = SimpleTokenizer()
    scenes, _ = rendered_scenes("color_attr", n=40)
    captions, metas = [caption_for(s) for s in scenes], [scene_meta(s, []) for s in scenes]
    cells = attributes.object_cells
    apart = [b for b, m in enumerate(metas) if not set(cells(m["objects"][0], 4)) & set(cells(m["objects"][1], 4))]
    captions, metas = [captions[b] for b in apart], [metas[b] for b in apart]
    assert len(captions) >= 10

    def maps(word_of) -> torch.Tensor:
        """(B, 16, 12): object o's cells read word_of(o) ("a COLOUR SHAPE and a COLOUR SHAPE" word index; a
        word's tokens alike), every other cell the start token."""
        probs = torch.zeros(len(captions), 16, 12)
        probs[:, :, 0] = 1.0
        for b, (caption, meta) in enumerate(zip(captions, metas)):
            spans = word_token_positions(tokenizer, caption)
            for o, obj in enumerate(meta["objects"]):
                tokens = spans[word_of(o)]
                probs[b, cells(obj, 4)] = 0.0
                probs[b, cells(obj, 4)[:, None], tokens] = 1.0 / len(tokens)
        return probs

    def shares(word_of) -> dict:
        read = attributes.reading_shares([maps(word_of)], captions, metas, tokenizer)
        assert read["objects"] == 2 * len(captions)
        return read["shares"][0]

    colour, shape = (1, 5), (2, 6)  # "a|an COLOUR SHAPE and a|an COLOUR SHAPE"
    words = [c.split() for c in captions]
    assert all(w[1] in COLORS and w[2] in SHAPES and w[5] in COLORS and w[6] in SHAPES for w in words)
    assert shares(lambda o: colour[o])["own colour"] == pytest.approx(1.0, abs=1e-3)
    assert shares(lambda o: colour[1 - o])["other colour"] == pytest.approx(1.0, abs=1e-3)
    assert shares(lambda o: shape[o])["own shape"] == pytest.approx(1.0, abs=1e-3)
    assert shares(lambda o: shape[1 - o])["other shape"] == pytest.approx(1.0, abs=1e-3)
    assert shares(lambda o: 3)["rest"] == pytest.approx(1.0, abs=1e-3)  # "and"


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


def test_main_reads_what_each_object_reads(prior_run, data, tmp_path, capsys):
    from latentdiff.data import scenes

    real = tmp_path / "scenes"  # real colour attribution scenes at the prior's 32 px
    scenes.build(real, 4, val_n=2, test_n=36, seed=0, resolution=32)
    args = ["--prior", str(prior_run[0]), "--steps", "1", "--guidance", "1", "--n", "1", "--pairs", "1",
            "--out", str(tmp_path / "a.json")]  # fmt: skip
    figures = attributes.main([*args, "--data", str(real), "--reading", "--scenes", "3"])
    read = figures["reading"]
    assert read["scenes"] == 3 and read["objects"] == 6
    assert sorted(read["t"]) == [300, 600, 900]
    for rows in read["t"].values():
        assert len(rows) >= 1  # one per transformer
        for row in rows:
            assert all(0.0 <= row[k] <= 1.0 for k in attributes.READS)
            assert sum(row.values()) == pytest.approx(1.0, abs=3e-3)  # five shares rounded to 3 places
    capsys.readouterr()
    # Refused in one line before anything is loaded: no colour attribution scene to read, or no scene asked.
    no_scene, none_asked = ["--data", str(data)], ["--data", str(real), "--scenes", "0"]
    for bad, says in ((no_scene, "no colour attribution scene"), (none_asked, "--scenes is the test scenes")):
        with pytest.raises(SystemExit):
            attributes.main([*args, *bad, "--reading"])
        assert says in capsys.readouterr().err
