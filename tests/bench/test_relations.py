"""bench.relations: signed offsets on real scenes (and their negative controls), slot similarity by hand."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench import relations
from latentdiff.data.scenes import COLORS, CONVERSE, RELATIONS, SHAPES, caption_for
from latentdiff.text.sources import load_text_encoder
from tests.helpers import rendered_scenes


def test_real_scenes_hold_and_their_flipped_captions_do_not():
    scenes, images = rendered_scenes("position")
    true = relations.offset_summary(relations.signed_offsets(images, [caption_for(s) for s in scenes], COLORS))
    assert true["both_found"] == 1.0 and true["holds"] == 1.0 and true["flipped"] == 0.0 and true["mean_offset"] > 0.15
    converse = [
        relations.position_caption(s.objects[0].shape, s.objects[1].shape, CONVERSE[s.relation]) for s in scenes
    ]
    swapped = [relations.position_caption(s.objects[1].shape, s.objects[0].shape, s.relation) for s in scenes]
    for captions in (converse, swapped):  # the relation flipped, or the shapes named the other way round
        wrong = relations.offset_summary(relations.signed_offsets(images, captions, COLORS))
        assert wrong["holds"] == 0.0 and wrong["flipped"] == 1.0 and wrong["mean_offset"] == -true["mean_offset"]


def test_a_shape_the_image_lacks_is_not_an_offset():
    scenes, images = rendered_scenes("position", 4)
    absent = [next(x for x in SHAPES if x not in {o.shape for o in s.objects}) for s in scenes]
    missing = [relations.position_caption(s.objects[0].shape, x, s.relation) for x, s in zip(absent, scenes)]
    offsets = relations.signed_offsets(images, missing, COLORS)
    assert np.isnan(offsets).all() and relations.offset_summary(offsets)["both_found"] == 0.0
    with pytest.raises(ValueError, match="not a position caption"):
        relations.signed_offsets(images[:1], ["a star and a ring"], COLORS)


def test_position_captions_are_every_ordered_pair_under_every_relation():
    captions = relations.position_captions()
    assert len(captions) == len(set(captions)) == 6 * 5 * len(RELATIONS)
    assert "a star to the left of a ring" in captions and "a circle below a square" in captions


def test_slot_similarity_reads_the_named_slots(text_run):
    real = load_text_encoder(text_run[0])
    tokenizer = real.tokenizer
    width = tokenizer.vocab_size

    def fake(states_of):  # an encoder whose state at token i is one-hot of states_of(ids, i)
        def encode(prompts):
            ids = tokenizer(prompts)
            states = torch.zeros(*ids.shape, max(width, ids.shape[1]))
            for b, row in enumerate(ids.tolist()):
                for i in range(len(row)):
                    states[b, i, states_of(row, i)] = 1.0
            return SimpleNamespace(states=states)

        return SimpleNamespace(encode=encode, tokenizer=tokenizer)

    bag = relations.slot_similarity(fake(lambda row, i: row[i]))  # the word alone: where it stands is lost
    assert bag == {"same_shape_other_slot": 1.0, "other_shape_same_slot": 0.0}
    place = relations.slot_similarity(fake(lambda row, i: i))  # the index alone
    assert place == {"same_shape_other_slot": 0.0, "other_shape_same_slot": 1.0}


def test_main_on_a_text_run_writes_its_figures(text_run, tmp_path):
    out = tmp_path / "r.json"
    figures = relations.main(["--text", str(text_run[0]), "--out", str(out)])
    sim = figures["text"][str(text_run[0])]
    assert -1.0 <= sim["other_shape_same_slot"] <= 1.0 and -1.0 <= sim["same_shape_other_slot"] <= 1.0
    assert json.loads(out.read_text())["figures"] == figures
    with pytest.raises(SystemExit):
        relations.main(["--prior", "runs/none"])  # --prior without --data


def test_main_on_a_kept_checkpoint_of_a_prior(prior_run, tmp_path):
    from latentdiff.core.checkpoint import CheckpointError
    from latentdiff.data import scenes

    data = tmp_path / "scenes"  # the palette's source
    scenes.build(data, 4, val_n=2, test_n=2, seed=0, resolution=32)
    step = prior_run[1]["steps"]
    args = ["--prior", str(prior_run[0]), "--data", str(data), "--steps", "1", "--guidance", "1"]
    figures = relations.main([*args, "--checkpoint", str(step), "--out", str(tmp_path / "r.json")])
    assert figures["prior"]["checkpoint"] == step and figures["prior"]["images"] == 120
    with pytest.raises(CheckpointError, match=f"keeps no checkpoint of step {step + 1000}"):
        relations.main([*args, "--checkpoint", str(step + 1000)])


class _PlacingUNet:
    """A stand-in UNet with one transformer on a 4x4 grid whose cross-attention reads the first shape word at
    the cell on the side the caption asks (`sign` 1), or the other side (-1), and the second word opposite."""

    def __init__(self, encoder, sign: int):
        from latentdiff.prior.grounding import word_token_positions

        self.sign, self.maps = sign, None
        self.words = [word_token_positions(encoder.tokenizer, c) for c in relations.position_captions()]

    def cross_attention_maps(self):
        from contextlib import contextmanager

        @contextmanager
        def recording():
            self.maps = []
            yield self.maps

        return recording()

    def __call__(self, z, t, states, mask, pooled):
        captions = relations.position_captions()
        maps = torch.zeros(len(captions), 16, states.shape[1])
        for k, caption in enumerate(captions):
            _, axis, direction = RELATIONS[relations.parse_caption(caption).relation]
            # cells 0..15 row-major: the first word at one end of the axis (its negative end when the relation
            # asks for a negative offset), the second at the other; centres 0.125 and 0.875
            low, high = (0, 3) if axis == 0 else (0, 12)
            first, second = (low, high) if direction * self.sign < 0 else (high, low)
            maps[k, first, self.words[k][1]] = 1.0
            maps[k, second, self.words[k][-1]] = 1.0
        self.maps.append(maps)


def test_attention_offsets_are_signed_as_asked(text_run):
    encoder = load_text_encoder(text_run[0])
    for sign in (1, -1):
        offsets = relations.attention_offsets(_PlacingUNet(encoder, sign), encoder, (4, 8, 8), t=999)
        assert offsets == [pytest.approx(sign * 0.75)]
