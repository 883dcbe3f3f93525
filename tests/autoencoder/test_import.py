"""Pretrained KL autoencoders in and out: diffusers folders and SD single files import exactly, export round-trips.

diffusers (a test-only dependency) is the reference: its AutoencoderKL with random weights, and
its own LDM-checkpoint converter for the single-file names. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentdiff.autoencoder.convert import LDM_PREFIX, diffusers_name, ldm_namer
from latentdiff.autoencoder.interchange import import_autoencoder
from latentdiff.autoencoder.load import load_autoencoder
from latentdiff.autoencoder.model import AutoencoderConfig
from latentdiff.autoencoder.stage import PRESETS
from latentdiff.core import checkpoint as ckpt
from latentdiff.core.checkpoint import CheckpointError
from latentdiff.core.config import ConfigError, load_preset, load_toml
from latentdiff.core.errors import UserError
from latentdiff.scripts import cli
from latentdiff.scripts.import_autoencoder import main as import_main
from tests.helpers import AE_ARGS, OLD_TINY_AUTOENCODER, PRIOR_ARGS  # noqa: E402

diffusers = pytest.importorskip("diffusers")

SMALL = dict(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=32, sample_size=32)
# The options LDM never uses but diffusers allows: other group counts, no attention, no quant convs.
VARIANT = dict(
    block_out_channels=(8, 16, 16),
    layers_per_block=2,
    norm_num_groups=4,
    sample_size=32,
    mid_block_add_attention=False,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# Stable Diffusion 1.x/2.x's VAE (83.7M parameters), only on 32 px images here to stay fast.
SD = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=256)


MEASURE = dict(batch_size=2, batches=1)  # the latent std and range, measured on 2 of the shapes fixture's images


def make_diffusers_vae(layout: dict, seed: int = 0):
    torch.manual_seed(seed)
    levels = len(layout["block_out_channels"])
    return diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=4,
        **layout,
    ).eval()


def ldm_checkpoint(vae, path: Path) -> None:
    """A single-file SD checkpoint of `vae`: LDM names under first_stage_model., 1x1-conv attention, a UNet beside."""
    name = ldm_namer(len(vae.config.block_out_channels))
    tensors = {}
    for key, value in _our_names(vae).items():
        if ".mid_attn.attn." in key and key.endswith("weight"):
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        tensors[LDM_PREFIX + name(key)] = value.contiguous()
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 4, 3, 3)  # the prior, ignored
    save_file(tensors, str(path))


def _our_names(vae) -> dict[str, torch.Tensor]:
    from latentdiff.autoencoder.convert import config_from_diffusers
    from latentdiff.autoencoder.model import Autoencoder

    with torch.device("meta"):
        keys = Autoencoder(config_from_diffusers(dict(vae.config), "config")).state_dict().keys()
    theirs = vae.state_dict()
    return {k: theirs[diffusers_name(k)] for k in keys}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.committed_file(run, ckpt.MODEL)))


@torch.no_grad()
def assert_same_autoencoder(vae, run: Path, side: int, n: int = 2) -> None:
    """Posterior mean and log-variance, and the decoder output, equal diffusers' within 1e-5 (float32)."""
    ae, _ = load_autoencoder(run)
    x = torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1
    theirs, ours = vae.encode(x).latent_dist, ae.encode(x)
    torch.testing.assert_close(ours.mean, theirs.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.logvar, theirs.logvar, atol=1e-5, rtol=0)
    z = theirs.sample(generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ae.decode(z), vae.decode(z).sample, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def small_vae():
    return make_diffusers_vae(SMALL)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory, small_vae) -> Path:
    out = tmp_path_factory.mktemp("diffusers") / "small"
    small_vae.save_pretrained(out)
    return out


def test_small_diffusers_folder_imports_exactly(small_vae, small_folder, data, tmp_path):
    summary = import_autoencoder(small_folder, tmp_path / "run", data, **MEASURE)
    assert summary["downsampling"] == 4 and summary["channels"] == [32, 32, 64]
    assert summary["scale_from"] == "config" and summary["scale_factor"] == pytest.approx(0.18215)
    meta = ckpt.read_meta(tmp_path / "run", "autoencoder")
    space = meta["latent_space"]  # what a trained run records, read by every later stage
    assert space["scale"] == pytest.approx(0.18215) and space["downsampling"] == 4 and space["resolution"] == 32
    assert meta["scale_from"] == "config" and space["absmax"] > 0 and meta["latent_std"] > 0
    assert meta["imported_from"]["format"] == "diffusers"
    _, loaded = load_autoencoder(tmp_path / "run")
    assert loaded.to_dict() == space  # the encoder hash recorded is the one of the weights written
    assert_same_autoencoder(small_vae, tmp_path / "run", 32)


def test_diffusers_options_ldm_does_not_use_import_exactly(data, tmp_path):
    vae = make_diffusers_vae(VARIANT)
    vae.save_pretrained(tmp_path / "variant")
    import_autoencoder(tmp_path / "variant", tmp_path / "run", data, **MEASURE)
    assert_same_autoencoder(vae, tmp_path / "run", 16)


def test_stable_diffusion_layout_imports_exactly_from_a_folder_and_a_single_file(data, tmp_path):
    vae = make_diffusers_vae(SD)
    vae.save_pretrained(tmp_path / "sd_vae")
    summary = import_autoencoder(tmp_path / "sd_vae", tmp_path / "run", data, batch_size=1, batches=1, resolution=32)
    assert summary["downsampling"] == 8 and summary["latent_channels"] == 4
    # the base preset is this architecture exactly, so its runs export to diffusers
    base = load_preset(AutoencoderConfig, PRESETS, "base").model
    assert load_toml(AutoencoderConfig, tmp_path / "run" / ckpt.CONFIG).model == base
    assert_same_autoencoder(vae, tmp_path / "run", 16, n=1)  # 16 px: a 2x2 latent, enough and fast

    # The single file gives the same run, weights bit for bit, so the same outputs (the small model
    # checks single-file outputs against diffusers' own converter, below).
    ldm_checkpoint(vae, tmp_path / "sd.safetensors")
    summary = import_autoencoder(
        tmp_path / "sd.safetensors",
        tmp_path / "run_file",
        data,
        batch_size=1,
        batches=1,
        scaling_factor=0.18215,
        resolution=32,
    )
    assert summary["format"] == "single-file" and summary["scale_from"] == "argument"
    a, b = weights(tmp_path / "run"), weights(tmp_path / "run_file")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "run" / ckpt.CONFIG).read_text() == (tmp_path / "run_file" / ckpt.CONFIG).read_text()


def test_single_file_names_agree_with_diffusers_own_converter(small_vae, data, tmp_path):
    """The LDM names are checked against diffusers' converter, not against our own mapping."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ldm_checkpoint(small_vae, tmp_path / "sd.safetensors")
    other = make_diffusers_vae(SMALL, seed=5)  # other weights, then diffusers loads the file into it
    converted = convert_ldm_vae_checkpoint(load_file(str(tmp_path / "sd.safetensors")), dict(other.config))
    other.load_state_dict(converted, strict=True)
    import_autoencoder(tmp_path / "sd.safetensors", tmp_path / "run", data, **MEASURE, scaling_factor=0.5)
    assert_same_autoencoder(other, tmp_path / "run", 32)


def test_pickle_checkpoints_load_only_without_code(small_vae, data, tmp_path):
    ldm_checkpoint(small_vae, tmp_path / "sd.safetensors")
    torch.save({"state_dict": load_file(str(tmp_path / "sd.safetensors")), "global_step": 7}, tmp_path / "sd.ckpt")
    import_autoencoder(tmp_path / "sd.ckpt", tmp_path / "run", data, **MEASURE, scaling_factor=0.18215)
    assert_same_autoencoder(small_vae, tmp_path / "run", 32)

    import argparse

    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "code.ckpt")
    with pytest.raises(CheckpointError, match=r"code\.ckpt is a pickle that needs code.*weights_only=True"):
        import_autoencoder(tmp_path / "code.ckpt", tmp_path / "refused", data, **MEASURE, scaling_factor=1.0)
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("serialization", ["safetensors", "bin"])
def test_a_folder_with_only_the_fp16_variant_imports_upcast(small_vae, data, tmp_path, capsys, serialization):
    """What many hub VAEs ship: diffusion_pytorch_model.fp16.safetensors (or .fp16.bin) and no full-precision file."""
    folder = tmp_path / "fp16"
    fp16 = make_diffusers_vae(SMALL).to(torch.float16)
    fp16.save_pretrained(folder, variant="fp16", safe_serialization=serialization == "safetensors")
    weights_file = f"diffusion_pytorch_model.fp16.{serialization}"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", weights_file]
    summary = import_main([str(folder), "--out", str(tmp_path / "run"), "--data", str(data), "--batches", "1",
                           "--batch-size", "2", "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr().out
    assert weights_file in out and "float16 weights upcast to float32" in out, out
    assert summary["stored_dtype"] == "float16"
    assert all(v.dtype == torch.float32 for v in weights(tmp_path / "run").values())
    # The reference: diffusers itself loading the same variant, upcast the same way.
    reference = diffusers.AutoencoderKL.from_pretrained(folder, variant="fp16", torch_dtype=torch.float32).eval()
    assert_same_autoencoder(reference, tmp_path / "run", 32)


def test_a_folder_with_several_variants_needs_a_choice(data, tmp_path):
    folder = tmp_path / "variants"
    make_diffusers_vae(SMALL).to(torch.float16).save_pretrained(folder, variant="fp16")
    make_diffusers_vae(SMALL).to(torch.bfloat16).save_pretrained(folder, variant="bf16")
    with pytest.raises(UserError, match=r"variants bf16, fp16 and no full-precision file: pass --variant"):
        import_autoencoder(folder, tmp_path / "run", data, **MEASURE)
    summary = import_autoencoder(folder, tmp_path / "run", data, **MEASURE, variant="bf16")
    assert summary["stored_dtype"] == "bfloat16"
    with pytest.raises(UserError, match=r"no weights of variant 'fp32'.*bf16, fp16"):
        import_autoencoder(folder, tmp_path / "other", data, **MEASURE, variant="fp32")
    make_diffusers_vae(SMALL).save_pretrained(folder)  # a full-precision file beside them: diffusers' default
    summary = import_autoencoder(folder, tmp_path / "full", data, **MEASURE)
    assert summary["stored_dtype"] == "float32" and summary["weights"] == ["diffusion_pytorch_model.safetensors"]


def test_a_sharded_folder_imports_exactly(small_vae, data, tmp_path):
    small_vae.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1
    summary = import_autoencoder(tmp_path / "sharded", tmp_path / "run", data, **MEASURE)
    assert summary["weights"] == shards
    assert_same_autoencoder(small_vae, tmp_path / "run", 32)


def test_diffusers_old_attention_names_import_exactly(small_vae, small_folder, data, tmp_path, capsys):
    """Hub VAEs saved before diffusers 0.14 name attention query/key/value/proj_attn (diffusers still reads them)."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    folder = _copy_folder(small_folder, tmp_path / "old")
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    renamed = {}
    for key, value in state.items():
        for new_name, old_name in old.items():
            key = key.replace(f".attentions.0.{new_name}.", f".attentions.0.{old_name}.")
        renamed[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in renamed and not any(".to_q." in k for k in renamed)
    save_file(renamed, str(folder / "diffusion_pytorch_model.safetensors"))
    # diffusers reads these names as the model we started from: they are the real old layout
    theirs = diffusers.AutoencoderKL.from_pretrained(folder).state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in small_vae.state_dict().items())
    summary = import_main([str(folder), "--out", str(tmp_path / "run"), "--data", str(data), "--batches", "1",
                           "--batch-size", "2", "--device", "cpu"])  # fmt: skip
    assert "older attention names" in capsys.readouterr().out
    assert summary["format"] == "diffusers"
    assert_same_autoencoder(small_vae, tmp_path / "run", 32)


def test_export_and_reimport_round_trip_exactly(small_vae, small_folder, data, tmp_path):
    import_autoencoder(small_folder, tmp_path / "run", data, **MEASURE)
    assert cli.main(["export", "autoencoder", str(tmp_path / "run"), "--out", str(tmp_path / "exported")]) == 0
    # diffusers itself reads the export, strictly, as the model we started from
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "exported").eval()
    assert dict(back.config)["scaling_factor"] == pytest.approx(0.18215)
    original = small_vae.state_dict()
    assert back.state_dict().keys() == original.keys()
    assert all(torch.equal(back.state_dict()[k], original[k]) for k in original)
    import_autoencoder(tmp_path / "exported", tmp_path / "again", data, **MEASURE)
    a, b = weights(tmp_path / "run"), weights(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "run" / ckpt.CONFIG).read_text() == (tmp_path / "again" / ckpt.CONFIG).read_text()
    # the same weights measured on the same images: the same latent facts, to the last bit
    meta_a, meta_b = ckpt.read_meta(tmp_path / "run"), ckpt.read_meta(tmp_path / "again")
    assert meta_a.pop("imported_from")["path"] != meta_b.pop("imported_from")["path"]
    assert meta_a == meta_b


def test_a_run_in_latentdiffs_own_layout_is_not_exported(ae_run, data, tmp_path, capsys):
    """The tiny preset is diffusers' AutoencoderKL layout (since 2026-12-06) and exports; the layout before it
    (symmetric padding, the upsampling conv narrowing), which older runs record, is refused in one line."""
    assert cli.main(["export", "autoencoder", str(ae_run[0]), "--out", str(tmp_path / "tiny")]) == 0
    assert json.loads((tmp_path / "tiny" / "config.json").read_text())["norm_num_groups"] == 8
    own = tmp_path / "own"
    cli.main(["train", "autoencoder", "--data", str(data), "--out", str(own), "--preset", "tiny", "--steps", "1",
              *AE_ARGS, *OLD_TINY_AUTOENCODER])  # fmt: skip
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["export", "autoencoder", str(own), "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "downsample_padding = 'symmetric'" in err and "upsample_narrows" in err
    assert not (tmp_path / "x" / "config.json").exists()


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_mismatched_sources_give_one_line_naming_what_differs(small_folder, data, ae_run, tmp_path, capsys):
    weights = "diffusion_pytorch_model.safetensors"
    # wrong shapes: the config promises a wider last level than the weights have
    wide = _copy_folder(small_folder, tmp_path / "wide")
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "block_out_channels": [32, 32, 96]}))
    with pytest.raises(
        CheckpointError,
        match=r"another shape \(encoder\.down_blocks\.2\.resnets\.0\.conv1\.weight "
        r"is \(64, 32, 3, 3\), needs \(96, 32, 3, 3\)",
    ):
        import_autoencoder(wide, tmp_path / "r1", data, **MEASURE)
    # missing tensors
    missing = _copy_folder(small_folder, tmp_path / "missing")
    state = load_file(str(missing / weights))
    del state["decoder.mid_block.attentions.0.to_q.bias"]
    save_file(state, str(missing / weights))
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) missing \(decoder\.mid_block\.attentions\.0\.to_q\.bias"):
        import_autoencoder(missing, tmp_path / "r2", data, **MEASURE)
    # another model: a diffusers UNet's config, and a file with no autoencoder in it
    unet = _copy_folder(small_folder, tmp_path / "unet")
    (unet / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ConfigError, match="describes a UNet2DConditionModel, not an AutoencoderKL"):
        import_autoencoder(unet, tmp_path / "r3", data, **MEASURE)
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3)}, str(tmp_path / "unet.safetensors"))
    for args in ([str(tmp_path / "unet.safetensors")], [str(wide)]):
        with pytest.raises(SystemExit) as e:
            cli.main(
                [
                    "import",
                    "autoencoder",
                    *args,
                    "--out",
                    str(tmp_path / "r4"),
                    "--scaling-factor",
                    "1",
                    "--data",
                    str(data),
                ]
            )
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("latentdiff: error:") and "\n" not in err
    assert "holds no KL autoencoder" in cli_error(tmp_path / "unet.safetensors", tmp_path / "r5", data, capsys)
    own_weights = ckpt.committed_file(ae_run[0], ckpt.MODEL)
    assert "latentdiff's own tensor names" in cli_error(own_weights, tmp_path / "r5", data, capsys)
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 6))


def cli_error(src: Path, out: Path, data: Path, capsys) -> str:
    with pytest.raises(SystemExit):
        cli.main(["import", "autoencoder", str(src), "--out", str(out), "--scaling-factor", "1", "--data", str(data)])
    return capsys.readouterr().err


def test_a_prior_trains_on_imported_latents_and_generates(small_folder, data, text_run, root, tmp_path):
    """The imported run works unchanged downstream: measured scale, prior, evaluate-autoencoder, decoder
    fine-tuning, generate."""
    from latentdiff.decoder.stage import main as decoder_main
    from latentdiff.evaluation import reconstruction
    from latentdiff.prior.stage import main as prior_main
    from latentdiff.scripts.import_autoencoder import main as import_main

    ae = tmp_path / "imported"
    summary = import_main(
        [
            str(small_folder),
            "--out",
            str(ae),
            "--scale",
            "data",
            "--data",
            str(data),
            "--batch-size",
            "4",
            "--batches",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert summary["scale_from"] == "data" and summary["scale_factor"] != pytest.approx(0.18215)
    meta = ckpt.read_meta(ae, "autoencoder")
    space = meta["latent_space"]
    assert space["absmax"] > 0 and space["scale"] == pytest.approx(1 / meta["latent_std"])
    prior = tmp_path / "prior"
    prior_main(
        [
            "--data",
            str(data),
            "--autoencoder",
            str(ae),
            "--text",
            str(text_run[0]),
            "--out",
            str(prior),
            "--steps",
            "2",
            *PRIOR_ARGS,
            "--set",
            "train.warmup_steps=0",
        ]
    )
    assert ckpt.read_meta(prior, "prior")["latent_space"] == space
    report = reconstruction.main(
        [
            "--run",
            str(ae),
            "--data",
            str(data),
            "--split",
            "val",
            "--n",
            "4",
            "--lpips",
            "off",
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    assert report["images"] == 4 and report["psnr"] > 0
    decoder_main(
        [
            "--autoencoder",
            str(ae),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "decoder"),
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--set",
            "eval_images=4",
        ]
    )
    out = tmp_path / "gen"
    assert (
        cli.main(
            [
                "generate",
                "a red circle",
                "--run",
                str(prior),
                "--n",
                "2",
                "--steps",
                "2",
                "--decoder",
                str(tmp_path / "decoder"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    settings = json.loads((out / "settings.json").read_text())
    assert len(settings["files"]) == 2 and all((out / f).is_file() for f in settings["files"])


def test_vae_speed_benchmark_times_an_imported_run(small_folder, data, tmp_path):
    from bench import vae_speed

    import_autoencoder(small_folder, tmp_path / "run", data, **MEASURE)
    out = tmp_path / "vae_speed.json"
    figures = vae_speed.main(
        ["--run", str(tmp_path / "run"), "--sizes", "16,32", "--batch-size", "1", "--repeats", "1", "--out", str(out)]
    )
    assert [r["latent"] for r in figures["results"]] == [[4, 4, 4], [4, 8, 8]]
    assert all(r["encode_images_per_s"] > 0 and r["decode_images_per_s"] > 0 for r in figures["results"])
    assert json.loads(out.read_text())["figures"] == figures
