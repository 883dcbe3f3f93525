"""The token grounding loss (prior/grounding.py): which words name which object, where each object lies on the
latent grid, the loss on cross-attention maps, and a prior trained with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip import SimpleTokenizer

from latentdiff.data import scenes
from latentdiff.data.scenes import COLORS, NUMBERS, PLURALS, TASKS, caption_for, sample_scene, scene_meta, shape_mask
from latentdiff.prior.grounding import Grounding, cell_cover, object_words, word_token_positions
from latentdiff.prior.stage import main as prior_main
from tests.helpers import PRIOR_ARGS, random_cross_attention_unet

TOKENIZER = SimpleTokenizer()


def _scenes(per_task: int = 6, resolution: int = 64):
    rng = np.random.default_rng(0)
    return [sample_scene(rng, resolution, task) for task in TASKS for _ in range(per_task)]


def test_every_template_names_each_object_by_its_own_words():
    for scene in _scenes():
        caption, meta = caption_for(scene), scene_meta(scene, [])
        words = caption.split()
        named = object_words(caption, meta)
        for i, objs in named:
            for o in objs:
                obj = scene.objects[o]
                # each word names an object it describes: its colour, its shape, or (counting) the count and plural
                assert words[i] in (obj.color, obj.shape, PLURALS[obj.shape], NUMBERS.get(len(scene.objects)))
        # every object is named by a shape word, and a colour the caption says is grounded on its object only
        for o, obj in enumerate(scene.objects):
            assert any(o in objs and words[i] in (obj.shape, PLURALS[obj.shape]) for i, objs in named)
            if scene.task in ("colors", "color_attr"):
                assert [i for i, objs in named if objs == (o,) and words[i] in COLORS] == [words.index(obj.color)]
        assert {i for i, _ in named} <= set(range(len(words)))
    # The relation words, articles and "and" name nothing; the second shape of a relation is the second object.
    assert object_words("a star to the left of a ring", {"objects": [{}, {}]}) == [(1, (0,)), (7, (1,))]
    assert object_words("", {"objects": [{}]}) == [] and object_words("a star", {}) == []


def test_word_token_positions_are_where_the_encoder_puts_each_word():
    for scene in _scenes(per_task=2):
        caption = caption_for(scene)
        ids = [TOKENIZER.sot_token_id, *TOKENIZER.encode(caption), TOKENIZER.eot_token_id]
        spans = word_token_positions(TOKENIZER, caption)
        assert len(spans) == len(caption.split())
        for word, span in zip(caption.split(), spans):
            assert [ids[j] for j in span] == TOKENIZER.encode(word)
        assert spans[-1][-1] == len(ids) - 2  # the last word ends just before [EOT]


def test_cell_cover_is_the_object_area_on_each_cell():
    for grid in (4, 8):  # the prior's attention grids at 64 px (8x8 latents)
        errors = []
        for scene in _scenes(per_task=4):
            for obj in scene.objects:
                cover = cell_cover(obj.shape, tuple(obj.center), obj.side, grid)
                assert cover.shape == (grid, grid) and cover.min() >= 0 and cover.max() <= 1
                fine = shape_mask(obj.shape, (obj.center[0] * 512, obj.center[1] * 512), obj.side * 512, 512)
                errors.append(abs(cover.mean() - fine.mean()) / fine.mean())
                row, col = int(obj.center[1] * grid), int(obj.center[0] * grid)
                if obj.shape != "ring":  # a ring's centre is its hole
                    assert cover[row, col] > 0  # x is the column, y the row
                outside = np.ones((grid, grid), bool)
                lo = np.floor((np.array(obj.center) - obj.side / 2) * grid).astype(int).clip(0, grid - 1)
                hi = np.floor((np.array(obj.center) + obj.side / 2) * grid).astype(int).clip(0, grid - 1)
                outside[lo[1] : hi[1] + 1, lo[0] : hi[0] + 1] = False
                assert not cover[outside].any()  # nothing outside the cells its square touches
        # The share of the image each object covers, as a 512-px render counts it: counted on 8 x 8 points a
        # cell, within 8% on average and 25% at worst (a 4x4 grid counts a 14-px object on a 32-px lattice).
        assert np.mean(errors) < 0.08 and max(errors) < 0.25


def _maps(words: torch.Tensor, cover: torch.Tensor, on: str, start_share: float = 0.0) -> torch.Tensor:
    """(B, P, T) attention maps: every position on the start token (0), except those an object covers, which
    put 1 - start_share on the words of that object ("right") or of another one ("swapped"); "even": every
    position spreads evenly over the T tokens."""
    B, n_obj, T = words.shape
    if on == "even":
        return torch.full((B, cover.shape[2], T), 1.0 / T)
    probs = torch.zeros(B, cover.shape[2], T)
    probs[:, :, 0] = 1.0
    for b in range(B):
        for o in range(n_obj):
            target = o if on == "right" else (o + 1) % n_obj
            if not words[b, o].any() or not words[b, target].any():
                continue
            at = cover[b, o] > 0
            probs[b, at] = start_share * F.one_hot(torch.tensor(0), T).float()
            probs[b, at] += (1 - start_share) * words[b, target] / words[b, target].sum()
    return probs


def _targets(batch, tokens: int = 12, grid: int = 4):
    """(Grounding, captions, metas, words, cover) of scenes: Grounding.targets on their captions and json."""
    captions = [caption_for(s) for s in batch]
    metas = [scene_meta(s, []) for s in batch]
    g = Grounding(TOKENIZER)
    return (g, captions, metas, *g.targets(captions, metas, tokens, grid))


def test_the_loss_is_zero_on_each_object_s_own_place_and_one_on_the_other_s():
    rng = np.random.default_rng(1)
    # Two objects apart on a 4x4 grid (at 64 px a cell is 16 px: a gap can still share one), so each
    # covered cell has one object.
    batch = []
    while len(batch) < 8:
        scene = sample_scene(rng, 64, ["position", "color_attr", "two_object"][len(batch) % 3])
        covers = [cell_cover(o.shape, tuple(o.center), o.side, 4) > 0 for o in scene.objects]
        if not (covers[0] & covers[1]).any():
            batch.append(scene)
    g, captions, metas, words, cover = _targets(batch)
    assert words.shape == (8, 2, 12) and cover.shape == (8, 2, 16)
    right = g.loss([_maps(words, cover, "right")], captions, metas)
    assert right.item() == pytest.approx(0.0, abs=1e-6)
    # A position an object covers may also read the start token: only where the object's words go counts.
    assert g.loss([_maps(words, cover, "right", start_share=0.5)], captions, metas).item() == pytest.approx(0, abs=1e-6)
    # The negative control: each object's words read only at the other object's place.
    assert g.loss([_maps(words, cover, "swapped")], captions, metas).item() == pytest.approx(1.0, abs=1e-6)
    # Even attention: each object's words get the share of the map its cells are.
    cells = (cover > 0).sum(dim=2).float() / 16  # (B, O)
    expected = ((1 - cells) ** 2).mean()
    even = g.loss([_maps(words, cover, "even")], captions, metas)
    assert even.item() == pytest.approx(expected.item(), abs=1e-6)
    # Two maps (two transformers): the mean of their losses.
    both = g.loss([_maps(words, cover, "right"), _maps(words, cover, "swapped")], captions, metas)
    assert both.item() == pytest.approx(0.5, abs=1e-6)
    # Dropped captions ("") and samples with no objects leave nothing to ground: zero, not NaN.
    assert g.loss([_maps(words, cover, "even")], [""] * 8, metas).item() == 0.0


def test_a_counting_caption_grounds_its_number_and_plural_on_all_its_objects():
    rng = np.random.default_rng(2)
    scenes_ = [sample_scene(rng, 64, "counting") for _ in range(6)]
    g, captions, metas, words, cover = _targets(scenes_)
    # One group per caption: the number and the plural name every object, so the place is their union.
    assert words.shape == (6, 1, 12) and cover.shape == (6, 1, 16)
    for b, scene in enumerate(scenes_):
        union = np.max([cell_cover(o.shape, tuple(o.center), o.side, 4) for o in scene.objects], axis=0)
        assert torch.equal(cover[b, 0], torch.from_numpy(union).flatten())
        spans = word_token_positions(TOKENIZER, captions[b])
        assert words[b, 0].nonzero().flatten().tolist() == spans[0] + spans[1]
    # Attention of the words on all the objects' cells is right (0); on one object's only it is too: the
    # words say "all of them", not which one, so any share inside the union counts.
    assert g.loss([_maps(words, cover, "right")], captions, metas).item() == pytest.approx(0.0, abs=1e-6)
    first = torch.stack(
        [torch.from_numpy(cell_cover(s.objects[0].shape, tuple(s.objects[0].center), s.objects[0].side, 4)).flatten()
         for s in scenes_]
    )[:, None]  # fmt: skip
    assert g.loss([_maps(words, first, "right")], captions, metas).item() == pytest.approx(0.0, abs=1e-6)
    # Off every object (on the start token's places only): 1.
    outside = (cover == 0).float()
    assert g.loss([_maps(words, outside, "right")], captions, metas).item() == pytest.approx(1.0, abs=1e-6)


def _attribution_batch(n: int = 4) -> tuple[list[str], list[dict]]:
    """Colour attribution captions and json whose two objects share no cell of the 4x4 grid and leave cells free."""
    rng = np.random.default_rng(3)
    batch = []
    while len(batch) < n:
        scene = sample_scene(rng, 64, "color_attr")
        covers = [cell_cover(o.shape, tuple(o.center), o.side, 4) > 0 for o in scene.objects]
        if not (covers[0] & covers[1]).any() and (covers[0] | covers[1]).sum() < 16:
            batch.append(scene)
    return [caption_for(s) for s in batch], [scene_meta(s, []) for s in batch]


def test_per_word_grounding_holds_each_colour_word_to_its_own_object():
    captions, metas = _attribution_batch()
    grouped, each = Grounding(TOKENIZER), Grounding(TOKENIZER, per_word=True)
    words, cover = each.targets(captions, metas, 12, 4)
    # Four groups a caption, one a word: colour and shape of the first object, then of the second.
    assert words.shape == (4, 4, 12) and cover.shape == (4, 4, 16)
    assert torch.equal(cover[:, 0], cover[:, 1]) and torch.equal(cover[:, 2], cover[:, 3])
    # Maps where each shape word is read on its object's cells only, and each colour word on the free cells
    # only (a bag of colours), at a tenth of the shape words' mass.
    probs = torch.zeros(4, 16, 12)
    probs[:, :, 0] = 1.0
    for b in range(4):
        free = (cover[b] == 0).all(dim=0)
        for g in (1, 3):  # the shape words
            probs[b, cover[b, g] > 0] = words[b, g]
        colours = words[b, 0] + words[b, 2]
        probs[b, free] = 0.1 * colours / colours.sum() + 0.9 * F.one_hot(torch.tensor(0), 12).float()
    # Per word, each colour word is wholly off its object (1) and each shape word on it (0): 0.5.
    assert each.loss([probs], captions, metas).item() == pytest.approx(0.5, abs=1e-6)
    # Grouped, the shape words' mass carries their group: the colour words' place costs far less.
    assert grouped.loss([probs], captions, metas).item() < 0.1
    # Colour words on their own objects only: 0 either way.
    for b in range(4):
        probs[b, (cover[b] == 0).all(dim=0)] = F.one_hot(torch.tensor(0), 12).float()
        for g in (0, 2):
            probs[b, cover[b, g] > 0] = (words[b, g] + words[b, g + 1]) / 2
    assert each.loss([probs], captions, metas).item() == pytest.approx(0.0, abs=1e-6)
    assert grouped.loss([probs], captions, metas).item() == pytest.approx(0.0, abs=1e-6)


def test_the_pixel_loss_wants_each_object_read_from_its_colour_and_shape_words_alike():
    captions, metas = _attribution_batch()
    g = Grounding(TOKENIZER)
    words, cover = g.targets(captions, metas, 12, 4, per_word=True)  # colour, shape; colour, shape

    def maps(colour_share: float, swapped: bool = False) -> torch.Tensor:
        """Each object's cells read colour_share from a colour word (its own, or with swapped the other
        object's) and the rest from its shape word; free cells read the start token."""
        probs = F.one_hot(torch.zeros(4, 16, dtype=torch.long), 12).float()
        for b in range(4):
            for o in (0, 1):
                colour, shape = words[b, 2 * (1 - o) if swapped else 2 * o], words[b, 2 * o + 1]
                # a word may be more than one token: its mass spread over them
                mix = colour_share * colour / colour.sum() + (1 - colour_share) * shape / shape.sum()
                probs[b, cover[b, 2 * o] > 0] = mix
        return probs

    shares = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9]
    losses = [g.pixel_loss([maps(a)], captions, metas).item() for a in shares]
    # Read from the shape word alone (where a grounded prior ends up): the colour word's cells cost most.
    assert losses[0] == max(losses) and losses[0] > 3 * losses[3]
    # Half from each word is the best split, and the loss rises on either side.
    assert min(losses) == losses[3] and losses[2] < losses[1] and losses[4] < losses[5]
    # The other object's colour word read instead of its own: as bad as not reading a colour at all.
    assert g.pixel_loss([maps(0.5, swapped=True)], captions, metas).item() > 3 * losses[3]
    # The same whatever per_word says (it is per word by definition), and 0 with nothing named.
    assert Grounding(TOKENIZER, per_word=True).pixel_loss([maps(0.5)], captions, metas).item() == losses[3]
    assert g.pixel_loss([maps(0.5)], ["", "", "", ""], [None] * 4).item() == 0.0


def test_unet_cross_attention_maps_match_the_forward_and_reset():
    g = torch.Generator().manual_seed(0)
    model = random_cross_attention_unet(g)
    z, t, context = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        plain = model(z, t, context, mask)
        with model.cross_attention_maps() as maps:
            recorded = model(z, t, context, mask)
    torch.testing.assert_close(recorded, plain)  # the math path computes the same function
    # down 8x8, down 4x4, middle 4x4, up 4x4 twice, up 8x8 twice
    assert [m.shape for m in maps] == [(2, 64, 5)] + [(2, 16, 5)] * 4 + [(2, 64, 5)] * 2
    for m in maps:
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:2]))
        assert m[1, :, 3:].max() < 1e-6  # masked tokens get nothing
    before = len(maps)
    with torch.no_grad():
        model(z, t, context, mask)
    assert len(maps) == before  # outside the context nothing is recorded


@pytest.fixture(scope="module")
def scenes_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    scenes.build(out, 16, val_n=4, test_n=4, seed=0, resolution=32)
    return out


@pytest.mark.parametrize("cached", [False, True])
def test_a_prior_trains_with_grounding_and_logs_it(scenes_data, ae_run, text_run, tmp_path, cached):
    out = tmp_path / "prior"
    argv = ["--data", str(scenes_data), "--autoencoder", str(ae_run[0]), "--text", str(text_run[0]), "--out", str(out),
            "--steps", "3", *PRIOR_ARGS, "--set", "grounding=0.5", "--set", "grounding_pixel=0.1",
            "--set", "train.log_every=1", "--set", "train.sample_every=0", "--set", "caption_dropout=0.0"]  # fmt: skip
    prior_main(argv + (["--cache-latents"] if cached else []))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ground = [m["grounding"] for m in logged if "grounding" in m]
    assert len(ground) == 3 and all(np.isfinite(ground)) and min(ground) > 0
    pixel = [m["grounding_pixel"] for m in logged if "grounding_pixel" in m]
    assert len(pixel) == 3 and all(np.isfinite(pixel)) and min(pixel) > 0
    if cached:  # the cache keeps each sample's json beside its caption, in the caption's order
        listed = json.loads((out / "latent_cache" / "captions.json").read_text())
        assert len(listed["meta"]) == len(listed["captions"]) == 16
        for caption, meta in zip(listed["captions"], listed["meta"]):
            assert caption_for_meta(meta) == caption


def caption_for_meta(meta: dict) -> str:
    objects = tuple(scenes.SceneObject(o["shape"], o["color"], tuple(o["center"]), o["side"]) for o in meta["objects"])
    return caption_for(scenes.Scene(meta["task"], objects, meta["relation"]))


def test_grounding_on_data_without_objects_is_refused_in_one_line(data, ae_run, text_run, tmp_path, capsys):
    out = tmp_path / "prior"
    argv = ["--data", str(data), "--autoencoder", str(ae_run[0]), "--text", str(text_run[0]),
            "--out", str(out), "--steps", "1", *PRIOR_ARGS, "--set", "grounding=0.5"]  # fmt: skip
    with pytest.raises(SystemExit):
        prior_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "grounding > 0 (or grounding_pixel) needs samples whose json lists each object" in err[0]
    assert "'shapes' dataset" in err[0] and not (out / "checkpoints").exists()
