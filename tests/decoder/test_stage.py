"""The decoder stage: encoder frozen bit for bit, decoders swapped in generation, mismatches refused, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentdiff.autoencoder.load import load_autoencoder
from latentdiff.core import checkpoint as ckpt
from latentdiff.core.checkpoint import CheckpointError
from latentdiff.data import shapes
from latentdiff.decoder.load import load_decoder
from latentdiff.decoder.stage import main as decoder_main
from latentdiff.prior.pipeline import TextToImage
from tests.helpers import RESUME_LR  # noqa: E402

DEC_ARGS = ["--batch-size", "4", "--set", "eval_images=8"]


@pytest.fixture(scope="module")
def decoder_run(root, data, ae_run) -> tuple[Path, dict]:
    out = root / "decoder"
    summary = decoder_main(
        [
            "--autoencoder",
            str(ae_run[0]),
            "--data",
            str(data),
            "--out",
            str(out),
            "--steps",
            "3",
            *DEC_ARGS,
            "--set",
            "train.warmup_steps=0",
            "--set",
            "train.lr=1e-2",
        ]
    )
    return out, summary


def test_encoder_and_latents_unchanged_by_decoder_training(ae_run, data, decoder_run):
    ae_dir = ae_run[0]
    before = load_file(str(ckpt.committed_file(ae_dir, ckpt.MODEL)))
    ae, _ = load_autoencoder(ae_dir)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z_before = ae.encode(x).mode()
    # training the decoder touched neither the autoencoder's files nor its encoder
    after = load_file(str(ckpt.committed_file(ae_dir, ckpt.MODEL)))
    assert all(torch.equal(before[k], after[k]) for k in before)
    ae2, _ = load_autoencoder(ae_dir)
    assert torch.equal(ae2.encode(x).mode(), z_before)
    # ...while the new decoder did change
    decoder, meta = load_decoder(decoder_run[0])
    assert meta["encoder_hash"] == load_autoencoder(ae_dir)[1].encoder_hash
    assert not torch.equal(decoder(z_before), ae.decode(z_before))
    summary = decoder_run[1]
    assert {"val_psnr", "val_psnr_original_decoder", "steps"} <= summary.keys() and summary["steps"] == 3


def test_generation_with_a_swapped_decoder(prior_run, decoder_run):
    own = TextToImage.from_run(prior_run[0])
    swapped = TextToImage.from_run(prior_run[0], decoder=decoder_run[0])
    a = own(["a red circle"], n=2, steps=3, seed=0)
    b = swapped(["a red circle"], n=2, steps=3, seed=0)
    assert a.shape == b.shape and not torch.equal(a, b)
    # Same latents, other decoder: decoding the pipeline's latents by hand gives the swapped images.
    assert swapped.decoder is not swapped.autoencoder.decoder
    # settings.json says which decoder made the images (None: the autoencoder's own).
    assert own.settings("a", n=1, steps=3, sampler=None, guidance=None, negative_prompt="", seed=0).decoder is None


def test_generate_records_the_decoder_in_settings(prior_run, decoder_run, tmp_path):
    from latentdiff.scripts import cli

    out = tmp_path / "gen"
    assert (
        cli.main(
            [
                "generate",
                "a red circle",
                "--run",
                str(prior_run[0]),
                "--decoder",
                str(decoder_run[0]),
                "--n",
                "1",
                "--steps",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads((out / "settings.json").read_text())["decoder"] == str(Path(decoder_run[0]).resolve())


def test_decoder_of_another_autoencoder_is_refused(root, data, other_ae_run, prior_run):
    out = root / "decoder_other"
    decoder_main(
        ["--autoencoder", str(other_ae_run), "--data", str(data), "--out", str(out), "--steps", "1", *DEC_ARGS]
    )
    with pytest.raises(CheckpointError, match="encoder hash"):
        TextToImage.from_run(prior_run[0], decoder=out)


def test_decoder_resume_is_exact(root, data, ae_run):
    straight, resumed = root / "dec_straight", root / "dec_resumed"
    common = ["--autoencoder", str(ae_run[0]), "--data", str(data), *DEC_ARGS, *RESUME_LR]
    decoder_main([*common, "--out", str(straight), "--steps", "4"])
    decoder_main([*common, "--out", str(resumed), "--steps", "2"])
    decoder_main(["--resume", str(resumed), "--steps", "4"])
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(str(ckpt.committed_file(run, name))) for run in (straight, resumed))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_upscaling_decoder_outputs_twice_the_resolution(root, ae_run):
    hires = root / "shapes64"
    shapes.build(hires, 16, val_n=4, test_n=2, seed=3, resolution=64, maxcount=16)
    out = root / "decoder_x2"
    summary = decoder_main(
        [
            "--autoencoder",
            str(ae_run[0]),
            "--data",
            str(hires),
            "--out",
            str(out),
            "--upscale",
            "2",
            "--steps",
            "2",
            *DEC_ARGS,
        ]
    )
    assert "val_psnr_bicubic_original_decoder" in summary
    decoder, meta = load_decoder(out)
    assert meta["upscale"] == 2
    assert decoder(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 64, 64)
