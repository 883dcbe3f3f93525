"""`latentdiff import pipeline`: a Stable Diffusion pipeline (folder or single file) as three ordinary runs.

Small random-weight SD-1-style and SD-2-style pipelines are built with diffusers and transformers and
saved to tmp folders (nothing is downloaded); diffusers' own single-file converter and schedulers
are the references. Each imported tensor must be the source's, bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentdiff.core import checkpoint as ckpt
from latentdiff.core.config import ConfigError
from latentdiff.core.errors import UserError
from latentdiff.prior.config import make_schedule
from latentdiff.prior.interchange import ldm_namer, to_diffusers
from latentdiff.prior.pipeline import TextToImage
from latentdiff.prior.sd_import import LDM_UNET_PREFIX, diffusion_from_scheduler, import_pipeline
from latentdiff.scripts.import_pipeline import main as import_main
from latentdiff.text.encoder import SD1, SD2
from latentdiff.text.interchange import from_hf, openclip_config, to_hf, write_clip_tokenizer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from tests.autoencoder.test_import import LDM_PREFIX, _our_names  # noqa: E402
from tests.autoencoder.test_import import ldm_namer as vae_ldm_namer  # noqa: E402

MEASURE = dict(batch_size=2, batches=1)  # the latent std and range, on 2 of the shapes fixture's images
SMALL_TYPES = dict(
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")
)
# SD 1.x at toy size: 8 heads and 32 groups as SD 1.x has them, so a single file's shapes give this config back.
SD1_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=32,
                attention_head_dim=8, sample_size=8, **SMALL_TYPES)  # fmt: skip
# SD 2.x at toy size: per-level heads, linear projections, two ResBlocks per level.
SD2_UNET = dict(SD1_UNET, attention_head_dim=[2, 4], use_linear_projection=True, layers_per_block=2, norm_num_groups=8)
VAE = dict(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=32, sample_size=32)  # f = 4
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # SD's


@pytest.fixture(autouse=True)
def _no_hub_kernels(monkeypatch):
    monkeypatch.setenv("USE_HUB_KERNELS", "0")  # transformers 5 asks for its `kernels` package otherwise


def _randomize(module, seed: int):
    """Every parameter random and non-trivial (norms too), so a swapped name shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


def build_pipeline(folder: Path, family: str, seed: int = 0) -> dict:
    """A small random SD pipeline saved as StableDiffusionPipeline.save_pretrained lays it out; returns its parts."""
    torch.manual_seed(seed)
    unet = _randomize(diffusers.UNet2DConditionModel(**(SD1_UNET if family == "sd1" else SD2_UNET)), seed)
    levels = len(VAE["block_out_channels"])
    vae = _randomize(
        diffusers.AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
            latent_channels=4, **VAE,
        ),
        seed + 1,
    )  # fmt: skip
    text_config = transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408,
        max_position_embeddings=77, hidden_act="quick_gelu" if family == "sd1" else "gelu",
    )  # fmt: skip
    text = _randomize(transformers.CLIPTextModel(text_config), seed + 2)
    if family == "sd1":
        scheduler = diffusers.PNDMScheduler(**SCHEDULER, skip_prk_steps=True)
    else:
        scheduler = diffusers.DDIMScheduler(**SCHEDULER, clip_sample=False, prediction_type="v_prediction")
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    write_clip_tokenizer(folder / "tokenizer", pad="end" if family == "sd1" else "zero")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return {"unet": unet, "vae": vae, "text": text, "scheduler": scheduler}


def hf_text_state(text) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's tensors under text_model.* (the names SD folders and files hold), no position_ids."""
    state = {k.removeprefix("text_model."): v for k, v in text.state_dict().items() if "position_ids" not in k}
    return {"text_model." + k: v for k, v in state.items()}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.committed_file(run, ckpt.MODEL)))


def assert_same_tensors(parts: dict, out: Path) -> None:
    """Each imported run holds its source's tensors exactly (bit for bit), through the interchange maps."""
    pipe = TextToImage.from_run(out / "prior", device="cpu")
    unet = to_diffusers(weights(out / "prior"), pipe.cfg.model)
    reference = parts["unet"].state_dict()
    assert sorted(unet) == sorted(reference)
    assert all(torch.equal(unet[k], reference[k]) for k in reference)
    # A penultimate-layer encoder (an SD 2.x file's) holds one block more than the folder's CLIPTextModel.
    layers = len(pipe.encoder.model.transformer.resblocks) - (pipe.encoder.settings.layer == "penultimate")
    text, reference = to_hf(weights(out / "text"), layers), hf_text_state(parts["text"])
    assert sorted(text) == sorted(reference)
    assert all(torch.equal(text[k], reference[k]) for k in reference)
    vae, reference = weights(out / "autoencoder"), _our_names(parts["vae"])
    assert sorted(vae) == sorted(reference)
    assert all(torch.equal(vae[k], reference[k]) for k in reference)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_pipeline_folder_imports_as_three_runs(tmp_path, data, family):
    parts = build_pipeline(tmp_path / "sd", family)
    summary = import_main([str(tmp_path / "sd"), "--out", str(tmp_path / "runs"), "--data", str(data),
                           "--batch-size", "2", "--batches", "1"])  # fmt: skip
    out = tmp_path / "runs"
    assert_same_tensors(parts, out)
    pipe = TextToImage.from_run(out / "prior", device="cpu")
    # A folder's SD 2.x text encoder already ends at OpenCLIP's penultimate block: its last layer is SD 2's states.
    assert pipe.encoder.settings == (SD1 if family == "sd1" else replace(SD2, layer="last"))
    diffusion = pipe.cfg.diffusion
    assert (diffusion.schedule, diffusion.timesteps, diffusion.zero_terminal_snr) == ("scaled_linear", 1000, False)
    assert diffusion.prediction == ("eps" if family == "sd1" else "v") == summary["prediction"]
    assert pipe.latent_space.scale == parts["vae"].config.scaling_factor == 0.18215
    assert pipe.latent_space.resolution == 32 and pipe.cfg.model.projection == ("conv" if family == "sd1" else "linear")
    images = pipe(["a red circle", "a blue square"], steps=2, seed=0, sampler="ddim")
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_scaled_linear_matches_diffusers_schedule():
    for rescale in (False, True):
        config = dict(diffusers.DDPMScheduler(**SCHEDULER, rescale_betas_zero_snr=rescale,
                                              prediction_type="v_prediction").config)  # fmt: skip
        ours = make_schedule(diffusion_from_scheduler(config, "scheduler_config.json"))
        theirs = diffusers.DDPMScheduler.from_config(config).alphas_cumprod.double()
        # diffusers computes the betas in float32, latentdiff in float64: they agree to float32's precision.
        assert (ours.alphas_cumprod - theirs).abs().max() < 1e-6
        assert ours.zero_terminal_snr == rescale
    for key, value, match in (
        ("beta_schedule", "squaredcos_cap_v2", "beta_schedule 'squaredcos_cap_v2'"),
        ("beta_end", 0.02, "from 0.00085 to 0.02"),
        ("prediction_type", "flow", "prediction_type 'flow'"),
        ("trained_betas", [0.1] * 1000, "trained_betas"),
    ):
        with pytest.raises(ConfigError, match=match):
            diffusion_from_scheduler({**SCHEDULER, key: value}, "scheduler_config.json")


def single_file(parts: dict, path: Path, family: str = "sd1") -> None:
    """A single-file checkpoint of `parts` under LDM's names (the UNet's through our ldm_namer).

    SD 2.x's text tower is open_clip's with all its blocks: one more than the folder's, random.
    """
    unet = parts["unet"]
    from latentdiff.prior.interchange import config_from_diffusers, diffusers_namer
    from latentdiff.prior.unet import UNet

    cfg = config_from_diffusers(dict(unet.config), "config")
    with torch.device("meta"):
        keys = UNet(cfg).state_dict().keys()
    theirs, name, to_diffusers_name = unet.state_dict(), ldm_namer(cfg), diffusers_namer(cfg)
    tensors = {LDM_UNET_PREFIX + name(k): theirs[to_diffusers_name(k)] for k in keys}
    vae_name = vae_ldm_namer(len(parts["vae"].config.block_out_channels))
    for key, value in _our_names(parts["vae"]).items():
        if ".mid_attn.attn." in key and key.endswith("weight"):
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        tensors[LDM_PREFIX + vae_name(key)] = value
    if family == "sd1":
        tensors.update({f"cond_stage_model.transformer.{k}": v for k, v in hf_text_state(parts["text"]).items()})
    else:
        tower = from_hf(hf_text_state(parts["text"]), "reference")
        g = torch.Generator().manual_seed(9)
        last = parts["text"].config.num_hidden_layers
        for key in [k for k in tower if k.startswith(f"transformer.resblocks.{last - 1}.")]:
            extra = key.replace(f".{last - 1}.", f".{last}.", 1)
            tower[extra] = torch.randn(tower[key].shape, generator=g)
        tensors.update({f"cond_stage_model.model.{k}": v for k, v in tower.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    # The reference: diffusers' own converter reads our LDM names back to its UNet's.
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    back = convert_ldm_unet_checkpoint({k: v for k, v in tensors.items() if k.startswith(LDM_UNET_PREFIX)},
                                       dict(unet.config))  # fmt: skip
    assert sorted(back) == sorted(theirs) and all(torch.equal(back[k], theirs[k]) for k in theirs)


def test_single_file_imports_the_same_tensors(tmp_path, data):
    parts = build_pipeline(tmp_path / "sd", "sd1")
    single_file(parts, tmp_path / "sd.safetensors")
    text_config = openclip_config(parts["text"].config.to_dict())
    summary = import_pipeline(tmp_path / "sd.safetensors", tmp_path / "runs", str(data), resolution=32,
                              text_config=text_config, **MEASURE)  # fmt: skip
    assert summary["format"] == "single-file" and summary["prediction"] == "eps"
    assert_same_tensors(parts, tmp_path / "runs")  # the UNet config read off the file's shapes is the folder's
    pipe = TextToImage.from_run(tmp_path / "runs" / "prior", device="cpu")
    assert pipe.encoder.settings == SD1 and pipe.latent_space.scale == 0.18215
    assert pipe(["a cat"], steps=2, seed=0, sampler="ddim").shape == (1, 3, 32, 32)


def test_sd2_single_file_imports_the_same_tensors(tmp_path, data):
    parts = build_pipeline(tmp_path / "sd", "sd2")
    single_file(parts, tmp_path / "sd2.safetensors", "sd2")
    hf = {**parts["text"].config.to_dict(), "num_hidden_layers": 3}  # the file's tower: all blocks
    common = dict(resolution=32, text_config=openclip_config(hf), unet_config=dict(parts["unet"].config), **MEASURE)
    with pytest.raises(UserError, match="pass --prediction eps .* or --prediction v"):
        import_pipeline(tmp_path / "sd2.safetensors", tmp_path / "runs", str(data), **common)
    summary = import_pipeline(tmp_path / "sd2.safetensors", tmp_path / "runs", str(data), prediction="v", **common)
    assert summary["family"] == "sd2" and summary["text_layer"] == "penultimate"
    assert_same_tensors(parts, tmp_path / "runs")
    pipe = TextToImage.from_run(tmp_path / "runs" / "prior", device="cpu")
    assert pipe.encoder.settings == SD2 and pipe.cfg.diffusion.prediction == "v"
    # The penultimate block's states of the file are the folder's last: the same text conditioning.
    folder = import_pipeline(tmp_path / "sd", tmp_path / "folder-runs", str(data), **MEASURE)
    assert folder["family"] == "sd2"
    from latentdiff.text.sources import load_text_encoder

    prompts = ["a photo of a cat", ""]
    a, b = load_text_encoder(tmp_path / "runs" / "text"), load_text_encoder(tmp_path / "folder-runs" / "text")
    assert torch.equal(a.encode(prompts).states, b.encode(prompts).states)


def test_what_does_not_fit_is_refused_in_one_line(tmp_path, data):
    build_pipeline(tmp_path / "sd", "sd1")
    (tmp_path / "xl").mkdir()
    xl = {"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    (tmp_path / "xl" / "model_index.json").write_text(json.dumps(xl))
    with pytest.raises(UserError, match="text_encoder_2: SDXL-style"):
        import_pipeline(tmp_path / "xl", tmp_path / "a", str(data), **MEASURE)
    (tmp_path / "sd" / "unet").rename(tmp_path / "unet-elsewhere")
    with pytest.raises(UserError, match=r"sd/unet is missing: put the UNet2DConditionModel .* in a folder unet/"):
        import_pipeline(tmp_path / "sd", tmp_path / "b", str(data), **MEASURE)
    (tmp_path / "unet-elsewhere").rename(tmp_path / "sd" / "unet")
    config = json.loads((tmp_path / "sd" / "unet" / "config.json").read_text())
    (tmp_path / "sd" / "unet" / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    with pytest.raises(ConfigError, match="describes a UNet2DModel"):
        import_pipeline(tmp_path / "sd", tmp_path / "c", str(data), **MEASURE)
    save_file({"conditioner.embedders.0.transformer.x": torch.zeros(1)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(UserError, match="SDXL-style"):
        import_pipeline(tmp_path / "xl.safetensors", tmp_path / "d", str(data), **MEASURE)
    assert not any((tmp_path / name).exists() for name in "abcd")  # nothing written


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_unet_layout_is_read_off_a_files_shapes(family):
    """SD 1.5's and 2.1's UNets (shapes only, on the meta device): a file's shapes give back their configs."""
    from latentdiff.prior.interchange import config_from_diffusers
    from latentdiff.prior.sd_import import unet_config_from_ldm
    from latentdiff.prior.unet import UNet
    from tests.prior.test_unet_sd import SD15, SD21

    want = config_from_diffusers(dict(SD15 if family == "sd1" else SD21), "config.json")
    with torch.device("meta"):
        state = UNet(want).state_dict()
    name = ldm_namer(want)
    config = unet_config_from_ldm({name(k): v for k, v in state.items()}, family, "sd.safetensors")
    assert config_from_diffusers(config, "read off the shapes") == want


def test_imported_runs_move_with_their_folder(tmp_path, data, monkeypatch):
    """The text run names its open_clip config relative to itself: DIR moved elsewhere still generates."""
    build_pipeline(tmp_path / "sd", "sd1")
    import_pipeline(tmp_path / "sd", tmp_path / "runs", str(data), **MEASURE)
    assert 'model = "open_clip_config.json"' in (tmp_path / "runs" / "text" / "config.toml").read_text()
    before = TextToImage.from_run(tmp_path / "runs" / "prior", device="cpu")(["a cat"], steps=2, seed=0, sampler="ddim")
    (tmp_path / "runs").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "sd")  # another working directory
    after = TextToImage.from_run(tmp_path / "moved" / "prior", device="cpu")(["a cat"], steps=2, seed=0, sampler="ddim")
    assert torch.equal(before, after)


def test_a_failed_import_leaves_nothing(tmp_path, data, monkeypatch):
    """A write that fails after the autoencoder and text runs are written removes them, and the --out it made."""
    import latentdiff.prior.sd_import as sd_import

    build_pipeline(tmp_path / "sd", "sd1")
    records = sd_import.stage_records

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sd_import, "stage_records", fail)  # just before the prior run is written
    with pytest.raises(OSError, match="disk full"):
        import_pipeline(tmp_path / "sd", tmp_path / "runs", str(data), **MEASURE)
    assert not (tmp_path / "runs").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "other-run").mkdir()
    with pytest.raises(OSError, match="disk full"):
        import_pipeline(tmp_path / "sd", tmp_path / "kept", str(data), **MEASURE)
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["other-run"]  # what was there before stays
    monkeypatch.setattr(sd_import, "stage_records", records)
    import_pipeline(tmp_path / "sd", tmp_path / "kept", str(data), **MEASURE)  # the same command now succeeds
