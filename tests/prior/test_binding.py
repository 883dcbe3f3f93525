"""Attention binding at sampling time (prior/binding.py): which tokens each named object owns, the energy on
constructed maps, and the denoiser it wraps."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from open_clip import SimpleTokenizer

from latentdiff.prior.binding import binding_denoiser, binding_energy, caption_groups
from latentdiff.prior.parameters import call_arguments, generate_command
from latentdiff.prior.schedule import NoiseSchedule
from latentdiff.scripts import cli
from tests.helpers import cli_exit_2, random_cross_attention_unet

TOKENIZER = SimpleTokenizer()


def test_each_object_owns_its_colour_and_shape_tokens():
    # [SOT] a red star and a blue ring [EOT]: every word one token, at positions 1..7
    assert caption_groups(TOKENIZER, "a red star and a blue ring") == [([2], [3]), ([6], [7])]
    assert caption_groups(TOKENIZER, "a star to the left of a ring") == [(None, [2]), (None, [8])]
    # Nothing to bind: one object; a count names all its objects with one word; text no template makes
    assert caption_groups(TOKENIZER, "an orange cross") == [] and caption_groups(TOKENIZER, "a star") == []
    assert caption_groups(TOKENIZER, "three stars") == []
    assert caption_groups(TOKENIZER, "a photo of a dog") == []
    assert caption_groups(TOKENIZER, "") == []


def _maps(layout: str) -> torch.Tensor:
    """(1, 16, 9) maps of "a red star and a blue ring" on a 4x4 grid: the star's words read at cells 0-3, the
    ring's at cells 12-15 ("bound"); "swapped": each colour word read at the other shape's cells; "merged": both
    shapes and colours read at cells 0-3. Free cells read [SOT]."""
    probs = torch.zeros(1, 16, 9)
    probs[0, :, 0] = 1.0
    red, star, blue, ring = 2, 3, 6, 7
    star_cells, ring_cells = range(0, 4), range(12, 16)
    if layout == "merged":
        ring_cells = star_cells
    places = {star: star_cells, ring: ring_cells}
    places |= {red: ring_cells, blue: star_cells} if layout == "swapped" else {red: star_cells, blue: ring_cells}
    for cells in (star_cells, ring_cells):
        probs[0, list(cells)] = 0.0
    for token, cells in places.items():
        probs[0, list(cells), token] += 1.0
    return probs / probs.sum(-1, keepdim=True)


def test_the_energy_is_lowest_with_each_colour_read_where_its_shape_is_and_the_objects_apart():
    groups = [caption_groups(TOKENIZER, "a red star and a blue ring")]
    bound, swapped, merged = (binding_energy([_maps(k)], groups).item() for k in ("bound", "swapped", "merged"))
    assert bound == pytest.approx(0.0, abs=1e-6)
    # Swapped colours: each colour far from its shape and on the other's; merged: the objects not apart
    log2 = torch.log(torch.tensor(2.0)).item()
    assert swapped == pytest.approx(4 * log2, abs=1e-5) and merged == pytest.approx(3 * log2, abs=1e-5)
    # Averaged over the maps, per row; a row without objects to bind adds nothing
    two = binding_energy([_maps("bound"), _maps("swapped")], groups).item()
    assert two == pytest.approx(swapped / 2, abs=1e-6)
    rows = binding_energy([torch.cat([_maps("swapped"), _maps("swapped")])], [groups[0], []])
    assert rows.shape == (2,) and rows[1].item() == 0.0 and rows[0].item() == pytest.approx(swapped, abs=1e-6)


def test_the_denoiser_moves_z_t_down_the_energy_and_keeps_its_pair_consistent():
    g = torch.Generator().manual_seed(1)
    unet, schedule = random_cross_attention_unet(torch.Generator().manual_seed(0)), NoiseSchedule.make("cosine")
    cond = (torch.randn(2, 9, 8, generator=g), torch.ones(2, 9, dtype=torch.bool), None)
    groups = [caption_groups(TOKENIZER, "a red star and a blue ring")] * 2
    z, t = torch.randn(2, 4, 8, 8, generator=g), torch.full((2,), 800.0)
    seen = []

    def denoiser(z_t, t):
        seen.append(z_t)
        return torch.zeros_like(z_t), schedule.eps_from_x0(z_t, torch.zeros_like(z_t), t)

    def energy(z_t):
        with torch.no_grad(), unet.cross_attention_maps() as maps:
            unet(z_t, t, *cond)
        return binding_energy(maps, groups)

    assert binding_denoiser(denoiser, unet, cond, groups, schedule, 0.0, 500) is denoiser
    assert binding_denoiser(denoiser, unet, cond, [[], []], schedule, 0.5, 500) is denoiser
    bind = binding_denoiser(denoiser, unet, cond, groups, schedule, 0.05, 500)
    x0, eps = bind(z, t)
    moved = seen[-1]
    # The prediction is taken at a state moved by 0.05 of z's scale (unit-RMS gradient), down the energy ...
    step = (moved - z).pow(2).mean(dim=(1, 2, 3)).sqrt()
    assert torch.allclose(step, torch.full((2,), 0.05), rtol=1e-4)
    assert (energy(moved) < energy(z)).all()
    # ... and the pair it returns is the sampler's own state's: z_t = sqrt(abar) x0 + sqrt(1 - abar) eps
    abar = schedule.abar(t).float().view(-1, 1, 1, 1)
    assert torch.allclose(abar.sqrt() * x0 + (1 - abar).sqrt() * eps, z, atol=1e-5)
    # Below `until` the state is not moved
    bind(z, torch.full((2,), 400.0))
    assert torch.equal(seen[-1], z)
    # Under bf16 autocast (the sampler's dtype on CUDA and AMX) the same step, in about the same direction
    binding_denoiser(denoiser, unet, cond, groups, schedule, 0.05, 500, dtype=torch.bfloat16)(z, t)
    step16 = (seen[-1] - z).pow(2).mean(dim=(1, 2, 3)).sqrt()
    assert torch.allclose(step16, torch.full((2,), 0.05), rtol=1e-4) and seen[-1].dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity((seen[-1] - z).flatten(1), (moved - z).flatten(1))
    assert (cosine > 0.9).all()
    with pytest.raises(ValueError, match="binding step must be a finite number >= 0"):
        binding_denoiser(denoiser, unet, cond, groups, schedule, -1.0, 500)


def test_the_pipeline_binds_scenes_captions_only_where_asked_and_records_it(pipe, prior_run, tmp_path, capsys):
    kw = dict(steps=4, sampler="dpmpp-2m", guidance=3.0, seed=3)
    assert pipe.settings("a star").binding == 0.0  # the run's [sampling] default: off
    scene, other = "a red star and a blue ring", "a large red circle on the left"  # the second no scenes caption
    plain = pipe([scene, other], **kw)
    bound = pipe([scene, other], binding=0.5, **kw)
    assert (bound[0] - plain[0]).abs().max() > 1e-3 and torch.equal(bound[1], plain[1])
    # From binding_until * T on: at 1.0 no level is bound
    assert torch.equal(pipe([scene, other], binding=0.5, binding_until=1.0, **kw), plain)
    for bad, says in ((dict(binding=-0.1), "binding must be"), (dict(binding_until=1.5), "binding_until must be")):
        with pytest.raises(ValueError, match=says):
            pipe.settings(scene, **bad)

    # The command and the PNG's JSON remake it: the step is always written, as a run's default may differ
    settings = pipe.settings(scene, binding=0.5, binding_until=0.25, **kw)
    assert "--binding 0.5 --binding-until 0.25" in generate_command(settings)
    assert "--binding 0.0" in generate_command(pipe.settings(scene, **kw))
    _, again, _ = call_arguments({**dataclasses.asdict(settings), "index": 0})
    assert (again["binding"], again["binding_until"]) == (0.5, 0.25)
    old = {k: v for k, v in dataclasses.asdict(settings).items() if not k.startswith("binding")}
    assert call_arguments({**old, "index": 0})[1]["binding"] == 0.0  # a PNG from before: made without

    argv = ["generate", scene, "--run", str(prior_run[0]), "--steps", "2", "--out"]
    assert cli.main([*argv, str(tmp_path / "g"), "--binding", "0.5"]) == 0
    record = json.loads((tmp_path / "g" / "settings.json").read_text())
    assert (record["binding"], record["binding_until"]) == (0.5, 0.5)
    err = cli_exit_2(capsys, [*argv, str(tmp_path / "refused"), "--binding", "-1"])
    assert "binding must be a finite number >= 0" in err and not (tmp_path / "refused").exists()
