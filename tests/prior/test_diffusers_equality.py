"""The same seed makes the same image here and in diffusers' StableDiffusionPipeline (#25 §5).

A small random-weight SD-1-style pipeline (UNet2DConditionModel, AutoencoderKL, CLIPTextModel with SD's
vocabulary and 77 positions, SD's tokenizer) is saved and read back into our TextToImage through the
interchange modules; image 0 of a seed from both, on the CPU in float32, must agree to PSNR >= 40 dB
for each deterministic sampler (DDIM eta 0, Euler, DPM-Solver++(2M)), with and without classifier-free
guidance and a negative prompt. Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from latentdiff.autoencoder.interchange import read_source
from latentdiff.autoencoder.model import Autoencoder
from latentdiff.core.errors import UserError
from latentdiff.core.latent_space import LatentSpace
from latentdiff.prior.config import DiffusionConfig, PriorConfig, make_schedule
from latentdiff.prior.interchange import config_from_diffusers, from_diffusers
from latentdiff.prior.pipeline import TextToImage
from latentdiff.prior.samplers import check_options, levels
from latentdiff.prior.sd_export import pipeline_problems, write_diffusers_pipeline
from latentdiff.prior.unet import UNet
from latentdiff.scripts.export_pipeline import main as export_pipeline_main
from latentdiff.text.interchange import read_diffusers, write_clip_tokenizer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SD_SCALE = 0.18215  # SD 1.x's vae.config.scaling_factor
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
# SD 1.x's scheduler settings: "leading" timesteps shifted up by one (steps_offset = 1)
SD_SPACING = dict(timestep_spacing="leading", steps_offset=1)
SCHEDULERS = {
    "ddim": lambda: diffusers.DDIMScheduler(**SD_BETAS, **SD_SPACING, set_alpha_to_one=False, clip_sample=False),
    "euler": lambda: diffusers.EulerDiscreteScheduler(**SD_BETAS, **SD_SPACING),
    # diffusers' DPM-Solver "leading" is its own, T // (N + 1) apart; its "trailing" is ours
    "dpmpp-2m": lambda: diffusers.DPMSolverMultistepScheduler(
        **SD_BETAS, timestep_spacing="trailing", algorithm_type="dpmsolver++", solver_order=2
    ),
}


@pytest.fixture(autouse=True)
def _no_hub_kernels(monkeypatch):
    # transformers 5 asks for its optional `kernels` package in from_pretrained unless told not to.
    monkeypatch.setenv("USE_HUB_KERNELS", "0")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    """A saved random-weight SD-1-style pipeline: 32 px images, 16 x 16 x 4 latents."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sd") / "pipe"
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, sample_size=32, scaling_factor=SD_SCALE,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )  # fmt: skip
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )  # fmt: skip
    ).eval()
    # A random UNet's eps is small next to z_t; scale its output conv so the images depend on the text and the steps.
    with torch.no_grad():
        unet.conv_out.weight.mul_(20.0)
    write_clip_tokenizer(folder / "tokenizer", pad="end")
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    SCHEDULERS["ddim"]().save_pretrained(folder / "scheduler")
    return folder


def diffusers_pipeline(folder: Path, sampler: str):
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=transformers.CLIPTextModel.from_pretrained(folder / "text_encoder"),
        tokenizer=tokenizer,
        unet=diffusers.UNet2DConditionModel.from_pretrained(folder / "unet"),
        scheduler=SCHEDULERS[sampler](),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def our_pipeline(folder: Path) -> TextToImage:
    """TextToImage over the same weights, assembled in memory (no runs on disk)."""
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    unet_cfg = config_from_diffusers(unet_config, "unet/config.json")
    unet = UNet(unet_cfg).eval()
    unet_state = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").state_dict()
    unet.load_state_dict(from_diffusers(unet_state, unet_cfg))
    source = read_source(folder / "vae")
    autoencoder = Autoencoder(source.model).eval()
    autoencoder.load_state_dict(source.state)
    encoder = read_diffusers(folder)
    space = LatentSpace(
        scale=source.scaling_factor, absmax=10.0, channels=4, downsampling=2, resolution=32, encoder_hash="test"
    )
    cfg = PriorConfig(
        model=unet_cfg,
        diffusion=DiffusionConfig(schedule="scaled_linear", prediction="eps", clip_x0="off"),
        resolution=32,
    )
    return TextToImage(unet, cfg, encoder, autoencoder, space, Path("in-memory"), precision="fp32")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [0, 1]."""
    mse = (a - b).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def compare(folder: Path, sampler: str, options: dict, guidance: float, negative: str, steps: int = 8, seed: int = 3):
    ours = our_pipeline(folder)
    mine = ours(
        "a red circle", steps=steps, sampler=sampler, guidance=guidance, negative_prompt=negative, seed=seed,
        sampler_options=options,
    )[0]  # fmt: skip
    theirs = diffusers_pipeline(folder, sampler)(
        "a red circle", num_inference_steps=steps, guidance_scale=guidance, negative_prompt=negative or None,
        generator=torch.Generator().manual_seed(seed), output_type="pt", height=32, width=32,
    ).images[0]  # fmt: skip
    return psnr((mine + 1) / 2, theirs), theirs


# Our sampler options that make diffusers' schedulers above: their timesteps, and DPM-Solver's last step.
OURS = {
    "ddim": {"spacing": "sd-leading", "eta": 0.0},
    "euler": {"spacing": "sd-leading"},
    "dpmpp-2m": {"spacing": "trailing", "final_order": 1},
}


@pytest.mark.parametrize("sampler", list(OURS))
@pytest.mark.parametrize("guidance,negative", [(1.0, ""), (7.5, ""), (7.5, "a blue square")])
def test_image_zero_is_diffusers_image(sd_folder, sampler, guidance, negative):
    value, theirs = compare(sd_folder, sampler, OURS[sampler], guidance, negative)
    print(f"PSNR {sampler} guidance {guidance} negative {negative!r}: {value:.1f} dB")
    assert theirs.std() > 0.01  # a real image, not a flat one both sides would agree on
    # The issue asks 40 dB; float32 agrees far closer, and 60 dB also catches a walk one timestep off (plain
    # "leading" against SD's offset: 44.6 dB). DDIM stays near 65 dB: SD's set_alpha_to_one=False ends at abar_0,
    # ours at the data (130.6 dB against set_alpha_to_one=True).
    assert value >= 60.0, f"{sampler}: PSNR {value:.1f} dB"


def test_each_sampler_visits_diffusers_timesteps():
    schedule = our_pipeline_schedule()
    for sampler, options in OURS.items():
        scheduler = SCHEDULERS[sampler]()
        scheduler.set_timesteps(8)
        ours = levels(sampler, schedule, 8, **options).ts
        assert ours == [float(t) for t in scheduler.timesteps.tolist()], sampler
        # the other spacing is a different walk: the comparison above can fail
        assert ours != levels(sampler, schedule, 8, spacing="leading").ts


def our_pipeline_schedule():
    return make_schedule(DiffusionConfig(schedule="scaled_linear"))


def test_image_k_is_diffusers_image_of_seed_plus_k(sd_folder):
    """Image k of a call is made from seed + k: diffusers' image 0 of that seed (DDIM, guided)."""
    mine = our_pipeline(sd_folder)(
        "a red circle", n=3, steps=6, sampler="ddim", guidance=5.0, seed=10, sampler_options=OURS["ddim"]
    )
    pipe = diffusers_pipeline(sd_folder, "ddim")
    for k in (0, 2):
        theirs = pipe(
            "a red circle", num_inference_steps=6, guidance_scale=5.0, generator=torch.Generator().manual_seed(10 + k),
            output_type="pt", height=32, width=32,
        ).images[0]  # fmt: skip
        assert psnr((mine[k] + 1) / 2, theirs) >= 40.0
    assert psnr(mine[0], mine[2]) < 30.0  # different seeds, different images


def test_sd_leading_refuses_a_walk_past_the_top_and_final_order_is_checked():
    schedule = our_pipeline_schedule()
    assert levels("ddim", schedule, 500, spacing="sd-leading").ts[0] == 999.0  # 499 * 2 + 1
    with pytest.raises(ValueError, match="sd-leading with 1000 steps starts at timestep 1000, above the top 999"):
        levels("ddim", schedule, 1000, spacing="sd-leading")
    with pytest.raises(ValueError, match="final_order must be one of 1, 2"):
        check_options("dpmpp-2m", {"final_order": 3})
    with pytest.raises(ValueError, match="takes no option 'final_order'"):
        check_options("unipc", {"final_order": 1})


# ---- out: our pipeline written as a StableDiffusionPipeline folder (#25 §4)


def test_written_pipeline_loads_in_diffusers_and_makes_image_zero(sd_folder, tmp_path):
    ours = our_pipeline(sd_folder)
    summary = write_diffusers_pipeline(ours, tmp_path / "out")
    assert summary["spacing"] == "sd-leading" and summary["clip_sample"] is None  # SD's scheduler, SD's walk
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
    mine = ours("a red circle", steps=8, sampler="ddim", guidance=7.5, seed=5, sampler_options=OURS["ddim"])[0]
    theirs = pipe(
        "a red circle", num_inference_steps=8, guidance_scale=7.5, generator=torch.Generator().manual_seed(5),
        output_type="pt",
    ).images[0]  # fmt: skip
    assert theirs.shape == (3, 32, 32) and theirs.std() > 0.01
    value = psnr((mine + 1) / 2, theirs)
    print(f"PSNR of the written pipeline, DDIM sd-leading: {value:.1f} dB")
    assert value >= 100.0  # the export ends on the data, as we do (set_alpha_to_one)
    with pytest.raises(UserError, match="already holds model_index.json"):
        write_diffusers_pipeline(ours, tmp_path / "out")


def test_export_refuses_the_layouts_before_the_tiny_presets_exported(pipe, tmp_path):
    """The tiny presets' layouts before 2026-12-06 (GroupNorms of gcd(32, width) groups, symmetric padding, the
    upsampling conv narrowing, the text mask up to EOT) are not diffusers': the one line names each field
    (docs/stable-diffusion.md); nothing is written. The runs keep their own layout (the `pipe` fixture's
    configs are restored after the test)."""
    unet, autoencoder, encoder = pipe.unet.cfg, pipe.autoencoder.cfg, pipe.encoder.settings
    assert not pipeline_problems(pipe)  # today's tiny presets export
    pipe.unet.cfg = replace(unet, norm_groups=32)  # widths 16, 32; the up path's 48 and 64
    pipe.autoencoder.cfg = replace(autoencoder, downsample_padding="symmetric", upsample_narrows=True)
    pipe.encoder.settings = replace(encoder, attend="to_end")
    try:
        with pytest.raises(UserError) as e:
            write_diffusers_pipeline(pipe, tmp_path / "out")
    finally:
        pipe.unet.cfg, pipe.autoencoder.cfg, pipe.encoder.settings = unet, autoencoder, encoder
    err = str(e.value)
    assert err.startswith("cannot write a StableDiffusionPipeline: UNet:") and "\n" not in err
    for field in ("model.norm_groups = 32 does not divide the widths [16, 48]", "model.downsample_padding",
                  "model.upsample_narrows", "encoder.attend"):  # fmt: skip
        assert field in err
    assert not (tmp_path / "out").exists()


def test_export_command_writes_a_tiny_run(prior_run, tmp_path):
    """`latentdiff export pipeline` on conftest's tiny-preset runs writes a folder diffusers reads."""
    summary = export_pipeline_main([str(prior_run[0]), "--out", str(tmp_path / "out")])
    assert summary["decoder"] == "autoencoder"
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
