"""Training previews a user can remake: every sample grid of `train prior` has beside it the `generate` command
that makes it again, pixel for pixel (issue #28)."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
from PIL import Image

from latentdiff.prior.stage import main as prior_main
from latentdiff.scripts import cli
from tests.helpers import PRIOR_ARGS


def recorded_command(grid) -> list[str]:
    """The command written beside a grid (its .txt: comment lines, then one command line), as argv."""
    lines = [line for line in grid.with_suffix(".txt").read_text().splitlines() if line and not line.startswith("#")]
    assert len(lines) == 1, lines
    words = shlex.split(lines[0])
    assert words[:2] == ["latentdiff", "generate"]
    return words[1:]


@pytest.fixture(scope="module")
def previewed_run(tmp_path_factory, data, ae_run, text_run):
    """4 steps, a grid and a checkpoint every 2, 2 images per prompt, an EMA, dropout on (so eval mode matters)."""
    out = tmp_path_factory.mktemp("previews") / "prior"
    prior_main(
        [
            "--data",
            str(data),
            "--autoencoder",
            str(ae_run[0]),
            "--text",
            str(text_run[0]),
            "--out",
            str(out),
            "--steps",
            "4",
            *PRIOR_ARGS,
            "--set",
            "sampling.per_prompt=2",
            "--set",
            "train.sample_every=2",
            "--set",
            "train.ckpt_every=2",
            "--set",
            "train.keep_checkpoints=3",
            "--set",
            "train.warmup_steps=0",
            "--set",
            "train.ema_decay=0.5",
            "--set",
            "model.dropout=0.5",
        ]
    )
    return out


@pytest.mark.parametrize("grid", ["samples/step_0000002.png", "samples/step_0000004.png", "samples.png"])
def test_every_preview_grid_is_remade_pixel_for_pixel_by_its_recorded_command(previewed_run, grid, tmp_path):
    grid = previewed_run / grid
    argv = recorded_command(grid)
    step = 4 if grid.name == "samples.png" else int(grid.stem.split("_")[1])
    assert argv[argv.index("--checkpoint") + 1] == str(step) and "--seed" in argv
    out = tmp_path / "again"
    assert cli.main([*argv, "--out", str(out)]) == 0
    with Image.open(grid) as preview, Image.open(out / "grid.png") as remade:
        assert preview.size == remade.size
        assert np.array_equal(np.asarray(preview.convert("RGB")), np.asarray(remade.convert("RGB")))
    # Not one picture repeated: two images of one prompt differ (each its own seed).
    first, second = json.loads((out / "settings.json").read_text())["files"][:2]
    with Image.open(out / first) as a, Image.open(out / second) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_preview_grids_of_two_checkpoints_differ(previewed_run):
    with (
        Image.open(previewed_run / "samples/step_0000002.png") as a,
        Image.open(previewed_run / "samples/step_0000004.png") as b,
    ):
        assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_a_preview_without_a_checkpoint_says_it_cannot_be_remade(tmp_path, data, ae_run, text_run):
    out = tmp_path / "prior"
    prior_main(
        [
            "--data",
            str(data),
            "--autoencoder",
            str(ae_run[0]),
            "--text",
            str(text_run[0]),
            "--out",
            str(out),
            "--steps",
            "2",
            *PRIOR_ARGS,
            "--set",
            "train.sample_every=1",
            "--set",
            "train.ckpt_every=0",
        ]
    )
    note = (out / "samples" / "step_0000001.txt").read_text()
    assert "no checkpoint was saved at step 1" in note and "latentdiff generate" not in note
    assert "--checkpoint 2" in (out / "samples" / "step_0000002.txt").read_text()  # the final save
