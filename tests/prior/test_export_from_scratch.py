"""A pipeline trained here from scratch exports, and diffusers makes the same image (#25 §4-§5).

Three tiny runs are trained in the test, as `latentdiff train --preset tiny` makes them (narrower, as every
test's): the tiny presets are layouts diffusers can build (docs/stable-diffusion.md, "Runs trained here"):
the autoencoder with LDM's padding, decoder depth and upsampling, the text run attending to every position,
the prior with one GroupNorm group count that divides every width. The prior keeps the tiny preset's cosine
schedule with zero terminal SNR, v prediction and z_0 clipping: the exported DDIMScheduler carries them as
trained_betas, "trailing" timesteps and clip_sample. `latentdiff generate --sampler ddim --spacing trailing`
and StableDiffusionPipeline on the exported folder, with a CPU torch.Generator, then make the same image.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.autoencoder.stage import main as autoencoder_main
from latentdiff.core.errors import UserError
from latentdiff.decoder.network import Decoder
from latentdiff.prior.pipeline import TextToImage
from latentdiff.prior.sd_export import write_diffusers_pipeline
from latentdiff.prior.stage import main as prior_main
from latentdiff.scripts.export_pipeline import main as export_main
from latentdiff.scripts.generate import main as generate_main
from latentdiff.text.stage import main as text_main
from tests.helpers import AE_ARGS, PRIOR_ARGS
from tests.prior.test_diffusers_equality import psnr

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

PROMPT, NEGATIVE = "a red circle", "a blue square"
STEPS = 8  # divides T = 1000: diffusers' DDIM steps back T // N from each "trailing" timestep


@pytest.fixture(autouse=True)
def _no_hub_kernels(monkeypatch):
    monkeypatch.setenv("USE_HUB_KERNELS", "0")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, data) -> Path:
    """A prior run trained here (3 steps) on an autoencoder and a text run trained here, tiny presets as they are."""
    root = tmp_path_factory.mktemp("scratch")
    autoencoder_main(["--data", str(data), "--out", str(root / "ae"), "--steps", "2", *AE_ARGS])
    text_main(["--data", str(data), "--out", str(root / "text"), "--steps", "2", "--batch-size", "8",
               "--set", "eval_images=8"])  # fmt: skip
    # As conftest's prior: no warm-up and a short EMA, so 3 steps move the zero-initialised output convolutions.
    prior_main(["--data", str(data), "--autoencoder", str(root / "ae"), "--text", str(root / "text"),
                "--out", str(root / "prior"), "--steps", "3", *PRIOR_ARGS, "--set", "train.warmup_steps=0",
                "--set", "train.ema_decay=0.5"])  # fmt: skip
    return root / "prior"


@pytest.fixture(scope="module")
def exported(scratch, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "sd"
    summary = export_main([str(scratch), "--out", str(out)])
    assert summary["spacing"] == "trailing" and summary["decoder"] == "autoencoder"
    return out


def diffusers_image(folder: Path, guidance: float, negative: str | None, seed: int) -> torch.Tensor:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPT, num_inference_steps=STEPS, guidance_scale=guidance, negative_prompt=negative,
        generator=torch.Generator().manual_seed(seed), output_type="pt",
    ).images[0]  # fmt: skip


def test_scratch_run_exports_with_its_schedule(scratch, exported):
    pipe = TextToImage.from_run(scratch, device="cpu", precision="fp32")
    assert pipe.cfg.diffusion.zero_terminal_snr and pipe.cfg.diffusion.prediction == "v"
    config = json.loads((exported / "scheduler" / "scheduler_config.json").read_text())
    assert config["timestep_spacing"] == "trailing" and config["set_alpha_to_one"]
    assert config["clip_sample"] and config["clip_sample_range"] == pytest.approx(pipe.clip_x0)
    scheduler = diffusers.DDIMScheduler.from_pretrained(exported / "scheduler")
    assert scheduler.alphas_cumprod[-1] == 0.0  # abar_T = 0: zero terminal SNR, carried by the betas
    assert (scheduler.alphas_cumprod.double() - pipe.schedule.alphas_cumprod).abs().max() < 1e-6
    scheduler.set_timesteps(STEPS)
    from latentdiff.prior.samplers import levels

    assert levels("ddim", pipe.schedule, STEPS, spacing="trailing").ts == [float(t) for t in scheduler.timesteps]


@pytest.mark.parametrize("guidance,negative", [(1.0, None), (3.0, NEGATIVE)])
def test_diffusers_makes_the_image_latentdiff_generate_makes(scratch, exported, tmp_path, guidance, negative):
    out = tmp_path / "generated"
    generate_main([PROMPT, "--run", str(scratch), "--out", str(out), "--n", "1", "--steps", str(STEPS),
                   "--sampler", "ddim", "--spacing", "trailing", "--eta", "0", "--guidance", str(guidance),
                   "--negative", negative or "", "--seed", "7", "--device", "cpu", "--precision", "fp32"])  # fmt: skip
    (png,) = [p for p in out.glob("*.png") if p.name != "grid.png"]
    mine = torch.from_numpy(np.asarray(Image.open(png).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    theirs = diffusers_image(exported, guidance, negative, seed=7)
    assert theirs.shape == mine.shape == (3, 32, 32) and theirs.std() > 0.01
    value = psnr(mine, theirs)
    print(f"PSNR guidance {guidance} negative {negative!r}: {value:.1f} dB (our PNG is 8-bit)")
    assert value >= 40.0, f"PSNR {value:.1f} dB"
    # In float32 (no PNG rounding) the two agree far closer; another seed is another image.
    ours = TextToImage.from_run(scratch, device="cpu", precision="fp32")
    image = ours(PROMPT, steps=STEPS, sampler="ddim", guidance=guidance, negative_prompt=negative or "", seed=7,
                 sampler_options={"spacing": "trailing", "eta": 0.0})[0]  # fmt: skip
    assert psnr((image + 1) / 2, theirs) >= 60.0
    assert psnr(theirs, diffusers_image(exported, guidance, negative, seed=8)) < 40.0


def test_a_fine_tuned_decoder_is_the_vaes_decoder(scratch, tmp_path):
    pipe = TextToImage.from_run(scratch, device="cpu", precision="fp32")
    decoder = Decoder(pipe.autoencoder.decoder.cfg)
    with torch.no_grad():
        for p in decoder.parameters():
            p.normal_(0, 0.05)
    tuned = TextToImage(pipe.unet, pipe.cfg, pipe.encoder, pipe.autoencoder, pipe.latent_space, pipe.run,
                        decoder=decoder.eval(), precision="fp32", decoder_run="runs/decoder")  # fmt: skip
    summary = write_diffusers_pipeline(tuned, tmp_path / "sd")
    assert summary["decoder"] == "runs/decoder"
    vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "sd" / "vae")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(vae.decode(z).sample, decoder(z), atol=1e-5)
        assert torch.equal(vae.encoder.conv_in.weight, pipe.autoencoder.encoder.conv_in.weight)
    wider = replace(decoder.cfg, channels=tuple(2 * c for c in decoder.cfg.channels))
    other = TextToImage(pipe.unet, pipe.cfg, pipe.encoder, pipe.autoencoder, pipe.latent_space, pipe.run,
                        decoder=Decoder(wider), precision="fp32", decoder_run="runs/wide")  # fmt: skip
    with pytest.raises(UserError, match=r"^cannot write .*the decoder run runs/wide has channels = \(16, 32, 32\)"):
        write_diffusers_pipeline(other, tmp_path / "wide")
    assert not (tmp_path / "wide").exists()


def test_a_failed_export_leaves_no_folder(scratch, tmp_path, monkeypatch):
    import latentdiff.prior.sd_export as sd_export

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sd_export, "export_text_encoder", fail)  # after unet/ and vae/ are written
    pipe = TextToImage.from_run(scratch, device="cpu", precision="fp32")
    with pytest.raises(OSError, match="disk full"):
        write_diffusers_pipeline(pipe, tmp_path / "sd")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder, no staging folder
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="taken already exists and is not empty"):
        write_diffusers_pipeline(pipe, tmp_path / "taken")


def test_clipped_z0_is_ddims_clip_sample(scratch, tmp_path):
    """A bound tight enough to clip every step: diffusers clips alike once CLIP_SAMPLE_BACK undoes the pipeline's
    own turning clip_sample off, and makes another image without it (so the bound is really in play)."""
    from latentdiff.prior.sd_export import CLIP_SAMPLE_BACK

    ours = TextToImage.from_run(scratch, device="cpu", precision="fp32")
    ours.clip_x0 = 0.2
    summary = write_diffusers_pipeline(ours, tmp_path / "sd")
    assert summary["clip_sample"] == 0.2
    mine = ours(PROMPT, steps=STEPS, sampler="ddim", guidance=3.0, negative_prompt=NEGATIVE, seed=7,
                sampler_options={"spacing": "trailing", "eta": 0.0})[0]  # fmt: skip
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "sd")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.clip_sample is False  # diffusers' pipeline turned it off
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=3.0, negative_prompt=NEGATIVE, output_type="pt")
    unclipped = pipe(PROMPT, generator=torch.Generator().manual_seed(7), **kwargs).images[0]
    exec(CLIP_SAMPLE_BACK, {"pipe": pipe})
    clipped = pipe(PROMPT, generator=torch.Generator().manual_seed(7), **kwargs).images[0]
    value, without = psnr((mine + 1) / 2, clipped), psnr((mine + 1) / 2, unclipped)
    print(f"PSNR with a clip at 0.2: {value:.1f} dB; diffusers without the clip: {without:.1f} dB")
    # 56 dB measured: float32 rounding decides a few values on either side of the bound.
    assert value >= 40.0 > without
