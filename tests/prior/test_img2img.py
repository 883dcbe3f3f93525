"""img2img (SDEdit), inpainting, one generator per image, and the PNG `parameters` round trip.

Sampler-level checks use the exact denoiser of Gaussian data (bench.sampler_accuracy); pipeline checks
use the session's tiny runs (tests/conftest.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from bench.sampler_accuracy import MU, STD, gaussian_denoiser
from latentdiff.core.pixels import to_uint8
from latentdiff.data.images import load_rgb
from latentdiff.prior.denoiser import Walk, noise
from latentdiff.prior.img2img import keep_known, load_image, load_mask, noised, sample_repaint
from latentdiff.prior.parameters import PNG_KEY
from latentdiff.prior.samplers import SAMPLERS, levels, sample
from latentdiff.prior.schedule import NoiseSchedule
from latentdiff.prior.spacing import SPACINGS, Spacing
from latentdiff.scripts import cli

F64 = torch.float64
SD = NoiseSchedule.make("scaled_linear")


# ---------------------------------------------------------------- starting part way: every sampler, every spacing


@pytest.mark.parametrize("spacing", SPACINGS)
def test_start_at_the_last_timestep_is_the_full_range_and_part_way_starts_there(spacing):
    full, top = Spacing(spacing).levels(SD, 10), Spacing(spacing).levels(SD, 10, t_start=SD.T - 1)
    assert top.ts == pytest.approx(full.ts) and top.abars == pytest.approx(full.abars)
    part = Spacing(spacing).levels(SD, 10, t_start=499.0)
    # leading: (N-1) floor(500 / N), as 900 of 1000 in full; sd-leading one more
    first = {"leading": 450.0, "sd-leading": 451.0}.get(spacing, 499.0)
    assert part.ts[0] == pytest.approx(first, abs=1e-6) and part.abars[-1] == 1.0
    assert all(a > b for a, b in zip(part.ts, part.ts[1:])) and part.ts[-1] >= 0
    with pytest.raises(ValueError, match="leaves 10 timesteps, fewer than the 20 steps"):
        Spacing(spacing).levels(SD, 20, t_start=9.0)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_sampler_started_part_way_from_the_exact_marginal_recovers_the_data(name, spacing):
    """From z ~ the exact law at the first level of t_start = 499, the output law is the data's N(0.5, 0.7^2)."""
    t_start, steps = 499.0, 40
    lv = levels(name, SD, steps, t_start, spacing=spacing)
    a0 = lv.abars[0]
    g = torch.Generator().manual_seed(0)
    z = noised(
        MU + STD * torch.randn(20_000, 1, generator=g, dtype=F64), torch.randn(20_000, 1, generator=g, dtype=F64), a0
    )
    seen, den = [], gaussian_denoiser(SD)

    def recording(z_t, t):
        seen.append(t[0].item())
        return den(z_t, t)

    out = sample(name, recording, z, SD, steps, generator=g, t_start=t_start, spacing=spacing)
    assert seen[0] == pytest.approx(lv.ts[0]) and max(seen) <= t_start + 1e-9  # starts at the first level
    # 40 steps from t = 499: the std within the samplers' discretisation error, the mean within 1%
    assert abs(out.std().item() / STD - 1) < 0.07 and abs(out.mean().item() / MU - 1) < 0.01


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_kept_region_lands_on_the_known_latents_for_every_sampler(name):
    """keep_known: x0_hat is z_init where the mask is 0; every sampler ends there (the final paste aside)."""
    g = torch.Generator().manual_seed(1)
    z_init = torch.randn(2, 1, 4, 4, generator=g, dtype=F64)
    mask = torch.zeros(1, 1, 4, 4, dtype=F64)
    mask[..., :, 2:] = 1.0  # repaint the right half
    den = keep_known(gaussian_denoiser(SD), z_init, mask, SD)
    z_T = torch.randn(2, 1, 4, 4, generator=g, dtype=F64)
    out = sample(name, den, z_T, SD, 10, generator=g, spacing="karras")
    kept = mask == 0
    torch.testing.assert_close(out[kept.expand_as(out)], z_init[kept.expand_as(z_init)], rtol=0, atol=1e-9)
    assert (out - z_init)[(~kept).expand_as(out)].abs().max() > 0.1  # the repainted half is new


@pytest.mark.parametrize("name", ["ddpm", "euler-a", "dpmpp-2m-sde"])
def test_stochastic_samplers_draw_each_rows_noise_from_its_own_generator(name):
    den = gaussian_denoiser(SD)
    z = torch.zeros(3, 1, 2, 2, dtype=F64)
    gens = [torch.Generator().manual_seed(10 + k) for k in range(3)]
    together = sample(name, den, noise(z, gens), SD, 8, generator=gens)  # z_T, then each step's noise
    for k in range(3):
        alone = [torch.Generator().manual_seed(10 + k)]
        row = sample(name, den, noise(z[:1], alone), SD, 8, generator=alone)
        torch.testing.assert_close(together[k : k + 1], row, rtol=0, atol=1e-12)
    assert not torch.equal(together[0], together[1])
    with pytest.raises(ValueError, match="2 generators for a batch of 3 rows"):
        noise(z, gens[:2])


# ---------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def init_png(tmp_path_factory) -> str:
    """A 48 x 40 picture (cropped and resized to the run's 32 by the one loader): a red disc on grey."""
    yy, xx = np.mgrid[:40, :48]
    pixels = np.full((40, 48, 3), 128, np.uint8)
    pixels[(yy - 20) ** 2 + (xx - 24) ** 2 < 120] = (220, 30, 30)
    path = tmp_path_factory.mktemp("img2img") / "init.png"
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture(scope="module")
def mask_png(init_png) -> str:
    """White (repaint) on the right half of the 32 x 32 image, black (keep) on the left."""
    pixels = np.zeros((32, 32), np.uint8)
    pixels[:, 16:] = 255
    path = init_png.replace("init.png", "mask.png")
    Image.fromarray(pixels).save(path)
    return path


def reconstruction(pipe, path):
    z = pipe.encode(load_image(path, pipe.latent_space.resolution))
    return pipe.decoder(pipe.latent_space.to_decoder(z)).clamp(-1, 1)


def test_strength_zero_is_the_reconstruction_and_one_is_text_to_image(pipe, init_png):
    kw = dict(n=2, steps=3, seed=4, sampler="ddim")
    with torch.inference_mode():
        recon = reconstruction(pipe, init_png)
    zero = pipe("a red circle", init_image=init_png, strength=0.0, **kw)
    torch.testing.assert_close(zero, recon.expand_as(zero), rtol=0, atol=1e-5)
    one = pipe("a red circle", init_image=init_png, strength=1.0, **kw)
    assert torch.equal(one, pipe("a red circle", **kw))
    half = pipe("a red circle", init_image=init_png, strength=0.5, **kw)
    assert not torch.allclose(half, one, atol=1e-3) and not torch.allclose(half, zero, atol=1e-3)
    assert (
        pipe.settings(
            "x", n=1, steps=3, sampler=None, guidance=None, negative_prompt="", seed=0, init_image=init_png
        ).strength
        == 0.75
    )  # img2img's default


def test_img2img_refuses_what_cannot_work(pipe, init_png, tmp_path):
    kw = dict(n=1, steps=None, sampler=None, guidance=None, negative_prompt="", seed=0)
    with pytest.raises(ValueError, match="strength must be a finite number in"):
        pipe.settings("x", init_image=init_png, strength=1.5, **kw)
    with pytest.raises(ValueError, match="a mask needs an init image"):
        pipe.settings("x", mask=init_png, **kw)
    with pytest.raises(ValueError, match="fewer than the 50 steps"):
        pipe.settings("x", init_image=init_png, strength=0.01, **{**kw, "steps": 50})
    with pytest.raises(ValueError, match="init image .*missing.png does not exist"):
        pipe.settings("x", init_image=tmp_path / "missing.png", **kw)
    black = tmp_path / "black.png"
    Image.new("L", (32, 32)).save(black)
    with pytest.raises(ValueError, match="no white .* nothing to inpaint"):
        pipe.settings("x", init_image=init_png, mask=black, **kw)


def test_inpainting_keeps_the_masked_out_region(pipe, init_png, mask_png):
    settings = pipe.settings(
        "a blue square",
        n=2,
        steps=4,
        sampler="dpmpp-2m",
        guidance=2.0,
        negative_prompt="",
        seed=3,
        init_image=init_png,
        mask=mask_png,
    )
    assert settings.strength == 1.0  # inpainting repaints from pure noise by default
    pixel_mask, latent_mask = load_mask(mask_png, 32, pipe.latent_space.downsampling)
    assert latent_mask.shape[-1] == 32 // pipe.latent_space.downsampling
    assert latent_mask[0, 0, 0].tolist() == [0.0] * (latent_mask.shape[-1] // 2) + [1.0] * (latent_mask.shape[-1] // 2)
    z = pipe.latents(settings)
    z_init = pipe.encode(load_image(init_png, 32))
    kept = (latent_mask == 0).expand_as(z)
    assert torch.equal(z[kept], z_init.expand_as(z)[kept])  # latent space: exactly the image's latents
    assert (z - z_init)[~kept].abs().mean() > 0.1  # the repainted half is new
    images = pipe.generate(settings)
    with torch.inference_mode():
        recon = reconstruction(pipe, init_png).expand_as(images)
    # Pixels: the kept half decodes to the reconstruction within the autoencoder's reconstruction error there
    # (the decoder reaches across the mask's edge; its mid-block attention sees the whole latent). On this
    # 3-step autoencoder: 0.27 against a reconstruction error of 0.35, while the repainted half is 0.43 away.
    # Pixels: the kept region is the input's own pixels, not the autoencoder's reconstruction of them
    # (composited after decoding), so 8-bit images keep those pixels exactly.
    x = load_image(init_png, 32).expand_as(images)
    kept_px = (pixel_mask == 0).expand_as(images)
    assert torch.equal(to_uint8(images)[kept_px], to_uint8(x)[kept_px])
    assert (to_uint8(recon) != to_uint8(x))[kept_px].any()  # which the reconstruction is not: the test can fail
    assert (images - x)[~kept_px].abs().mean() > 0.1  # the repainted half is new


def test_inpainted_pngs_keep_the_input_pixels_and_feather_only_into_the_repainted_region(
    prior_run, init_png, mask_png, tmp_path
):
    """The files a user gets: kept pixels equal the init image's (as the run reads it) to the 8-bit level."""
    common = ["generate", "a blue square", "--run", str(prior_run[0]), "--n", "2", "--steps", "3", "--seed", "2"]
    common += ["--init-image", init_png, "--mask", mask_png]
    pngs = {}
    for feather in (0, 3):
        out = tmp_path / f"feather{feather}"
        assert cli.main([*common, "--feather", str(feather), "--out", str(out)]) == 0
        record = json.loads((out / "settings.json").read_text())
        assert record["feather"] == feather and (f"--feather {feather}" in record["command"]) == (feather > 0)
        pngs[feather] = np.stack([np.asarray(Image.open(out / f)) for f in record["files"]]).astype(int)
    x = np.asarray(load_rgb(init_png, 32)).astype(int)  # the run's reading of the init image, (32, 32, 3)
    assert np.array_equal(pngs[0][:, :, :16], np.broadcast_to(x[:, :16], pngs[0][:, :, :16].shape))
    assert np.abs(pngs[0][:, :, 16:] - x[:, 16:]).mean() > 10  # the repainted half is new
    # feather 3: kept pixels still exact; 3 columns into the repainted half blend from the input to the new
    # image (alpha 1/4, 2/4, 3/4 at distances 1, 2, 3 from the kept region); beyond them, feather 0's pixels.
    assert np.array_equal(pngs[3][:, :, :16], pngs[0][:, :, :16])
    assert np.array_equal(pngs[3][:, :, 19:], pngs[0][:, :, 19:])
    for d in (1, 2, 3):
        col = 15 + d
        want = x[:, col] + d / 4 * (pngs[0][:, :, col] - x[:, col])
        assert np.abs(pngs[3][:, :, col] - want).max() <= 1  # rounding to 8 bits


def test_repaint_resampling_keeps_the_data_law_and_the_known_region():
    """RePaint (jump length 1) from the exact marginal: known latents kept, the rest still N(MU, STD^2).

    DDPM's ancestral steps shrink the std a little at few steps, and each retry compounds it (measured
    with this test's set-up: 0.60 / 0.55 / 0.49 at U = 1 / 3 / 10 with 20 steps, 0.68 / 0.67 at U = 1 / 5
    with 250, 0.707 at U = 1 with 1000): 100 steps and U = 2 are within 10%.
    """
    g = torch.Generator().manual_seed(2)
    z_init = MU + STD * torch.randn(2000, 1, 2, 2, generator=g, dtype=F64)
    mask = torch.zeros(1, 1, 2, 2, dtype=F64)
    mask[..., 1] = 1.0  # repaint the right column
    den = keep_known(gaussian_denoiser(SD), z_init, mask, SD)
    calls = []

    def counting(z_t, t):
        calls.append(t[0].item())
        return den(z_t, t)

    walk = Walk(SD, levels("ddpm", SD, 100), g)
    out = sample_repaint(counting, torch.randn(z_init.shape, generator=g, dtype=F64), walk, resample=2)
    assert len(calls) == 2 * 100  # U evaluations per step
    known = (mask == 0).expand_as(out)
    torch.testing.assert_close(out[known], z_init[known], rtol=0, atol=1e-12)
    new = out[~known]  # the data are independent per element: the repainted law is the data's own
    assert abs(new.std().item() / STD - 1) < 0.1 and abs(new.mean().item() / MU - 1) < 0.03
    assert not torch.allclose(new, z_init[~known], atol=0.1)


def test_repaint_resampling_in_the_pipeline(pipe, init_png, mask_png):
    kw = dict(n=1, steps=3, guidance=2.0, negative_prompt="", seed=1, init_image=init_png, mask=mask_png)
    once = pipe.generate(pipe.settings("a blue square", sampler="ddpm", **kw))
    settings = pipe.settings("a blue square", sampler="ddpm", resample=3, **kw)
    thrice = pipe.generate(settings)
    assert settings.resample == 3 and not torch.allclose(once, thrice, atol=1e-3)
    x = load_image(init_png, 32)
    kept = (load_mask(mask_png, 32, pipe.latent_space.downsampling)[0] == 0).expand_as(thrice)
    assert torch.equal(to_uint8(thrice)[kept], to_uint8(x.expand_as(thrice))[kept])
    with pytest.raises(ValueError, match="resample .*needs --sampler ddpm"):
        pipe.settings("x", sampler="dpmpp-2m", resample=3, **kw)
    with pytest.raises(ValueError, match="resample .*needs a mask"):
        pipe.settings("x", sampler="ddpm", resample=3, **{**kw, "mask": None})
    with pytest.raises(ValueError, match="feather must be"):
        pipe.settings("x", sampler="ddpm", feather=-1, **kw)


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "euler-a"])
def test_image_k_is_the_same_whatever_n_and_batch_size(pipe, sampler):
    prompts = ["a red circle", "a blue square"]
    kw = dict(steps=3, sampler=sampler, guidance=2.0)
    all_at_once = pipe(prompts, n=3, seed=5, batch_size=64, **kw)  # images k = 0..5, seeds 5..10
    in_twos = pipe(prompts, n=3, seed=5, batch_size=2, **kw)
    torch.testing.assert_close(in_twos, all_at_once, rtol=0, atol=1e-5)
    for k in (0, 4):  # alone, from its recorded seed seed + k
        alone = pipe(prompts[k // 3], n=1, seed=5 + k, **kw)
        torch.testing.assert_close(alone[0], all_at_once[k], rtol=0, atol=1e-5)
    assert pipe(prompts, n=3, seed=5, batch_size=2, only=[4], **kw).equal(in_twos[4:5])  # its batch, run again
    assert not torch.allclose(all_at_once[0], all_at_once[1], atol=1e-3)


# ---------------------------------------------------------------- PNG parameters and --from-png


def test_png_parameters_round_trip_through_from_png(prior_run, init_png, mask_png, tmp_path, capsys):
    out, again = tmp_path / "gen", tmp_path / "again"
    assert (
        cli.main(
            [
                "generate",
                "a red circle",
                "a green triangle",
                "--run",
                str(prior_run[0]),
                "--n",
                "2",
                "--steps",
                "3",
                "--seed",
                "11",
                "--sampler",
                "euler-a",
                "--batch-size",
                "3",
                "--init-image",
                init_png,
                "--mask",
                mask_png,
                "--strength",
                "0.8",
                "--guidance-interval",
                "0.5,20",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    settings = json.loads((out / "settings.json").read_text())
    name = settings["files"][3]  # prompt 1, image 1: index 3, seed 14, the second batch
    with Image.open(out / name) as png:
        params = json.loads(png.text[PNG_KEY])
        first = np.asarray(png.convert("RGB"))
    assert (params["index"], params["image_seed"], params["prompts"]) == (3, 14, ["a red circle", "a green triangle"])
    assert (params["strength"], params["mask"], params["init_image"]) == (0.8, mask_png, init_png)
    assert params["guidance_interval"] == [0.5, 20.0] and "--guidance-interval 0.5,20.0" in params["command"]
    assert params["command"].startswith("latentdiff generate 'a red circle' 'a green triangle' --run")
    assert cli.main(["generate", "--from-png", str(out / name), "--out", str(again)]) == 0
    remade = json.loads((again / "settings.json").read_text())
    assert remade["files"] == [name] and remade["seeds"] == [14]
    with Image.open(again / name) as png:
        assert np.array_equal(np.asarray(png.convert("RGB")), first)  # pixel-equal
        assert json.loads(png.text[PNG_KEY])["index"] == 3


def test_from_png_refuses_other_settings_and_foreign_pngs(prior_run, tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--from-png", str(plain), "--out", str(tmp_path / "a")])
    assert e.value.code == 2 and "no 'latentdiff' or 'parameters' text chunk" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--from-png", str(plain), "--n", "3", "--steps", "4", "--out", str(tmp_path / "b")])
    assert e.value.code == 2 and "--n, --steps cannot change it" in capsys.readouterr().err
