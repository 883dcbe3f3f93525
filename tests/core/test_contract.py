"""The contract between stages: the autoencoder's LatentSpace, one load_run for every stage, recorded paths.

A prior must never train or sample at a latent space other than the one it recorded; every run
rebuilds through core.runs.load_run; the paths a run records work from any directory and after
the whole tree moved; only local paths are read back from a run's records.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentdiff.autoencoder.load import load_autoencoder
from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig
from latentdiff.autoencoder.stage import main as autoencoder_main
from latentdiff.core import checkpoint as ckpt
from latentdiff.core.checkpoint import CheckpointError
from latentdiff.core.config import ConfigError, load_preset
from latentdiff.core.errors import UserError
from latentdiff.core.latent_space import LatentSpace
from latentdiff.core.runs import find_recorded, load_run, read_config, record_path
from latentdiff.data import shapes
from latentdiff.decoder.network import Decoder
from latentdiff.decoder.stage import DecoderStageConfig
from latentdiff.decoder.stage import main as decoder_main
from latentdiff.evaluation.classifier import Classifier, ClassifierStageConfig
from latentdiff.evaluation.classifier_stage import main as classifier_main
from latentdiff.prior.config import PriorConfig
from latentdiff.prior.latent_sampling import clip_bound
from latentdiff.prior.pipeline import TextToImage
from latentdiff.prior.stage import PRESETS as PRIOR_PRESETS
from latentdiff.prior.stage import main as prior_main
from latentdiff.prior.unet import UNet
from latentdiff.scripts import cli
from latentdiff.text.model import build_clip, load_model_config
from latentdiff.text.stage import TextStageConfig
from tests.helpers import AE_ARGS, PRIOR_ARGS  # noqa: E402


def _one_line_exit(capsys, main, argv: list[str]) -> str:
    """Run a stage's main, expect exit code 2 and a single line on stderr; return it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


# ---------------------------------------------------------------- the latent space


def test_latent_space_scales_both_ways_and_refuses_what_differs():
    space = LatentSpace(scale=0.5, absmax=3.0, channels=4, downsampling=4, resolution=32, encoder_hash="abc")
    z = torch.randn(2, 4, 8, 8)
    assert torch.equal(space.to_prior(z), z * 0.5)
    torch.testing.assert_close(space.to_decoder(space.to_prior(z)), z)
    assert space.latent_shape == (4, 8, 8)
    assert LatentSpace.from_dict(json.loads(json.dumps(space.to_dict())), "meta") == space  # exact through JSON
    space.check_same(LatentSpace.from_dict(space.to_dict(), "meta"), "runs/ae", "the prior")
    remeasured = LatentSpace(**{**space.to_dict(), "scale": 0.25})
    with pytest.raises(CheckpointError) as exc:
        remeasured.check_same(space, "runs/ae", "the prior runs/p")
    assert "scale 0.5 -> 0.25" in str(exc.value) and "runs/ae" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(CheckpointError, match="exactly the keys"):
        LatentSpace.from_dict({"scale": 1.0}, "meta")
    with pytest.raises(ValueError, match="multiple"):
        LatentSpace(scale=1.0, absmax=1.0, channels=4, downsampling=8, resolution=36, encoder_hash="x")


def test_clip_x0_takes_explicit_values():
    space = LatentSpace(scale=1.0, absmax=3.5, channels=4, downsampling=4, resolution=32, encoder_hash="x")

    def cfg(value: str) -> PriorConfig:
        return load_preset(PriorConfig, PRIOR_PRESETS, "tiny", [f"diffusion.clip_x0={value}"])

    assert load_preset(PriorConfig, PRIOR_PRESETS, "tiny").diffusion.clip_x0 == "latent"
    assert clip_bound(cfg('"latent"').diffusion, space) == 3.5
    assert clip_bound(cfg('"off"').diffusion, space) is None
    assert clip_bound(cfg("2").diffusion, space) == 2.0
    for bad in ("-1.0", "0"):
        with pytest.raises(ConfigError, match='"latent"'):
            cfg(bad)
    with pytest.raises(ConfigError, match="clip_x0"):
        cfg('"latnet"')


def test_a_prior_keeps_its_pinned_autoencoder_and_refuses_the_remeasured_one(
    capsys, root, data, ae_run, text_run, tmp_path
):
    ae = tmp_path / "ae"
    shutil.copytree(ae_run[0], ae)
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
            "1",
            *PRIOR_ARGS,
        ]
    )
    _, before = load_autoencoder(ae)
    # Resuming the finished autoencoder on other data (asked for) changes no weight but re-measures the scale.
    other = root / "shapes_other"
    if not other.exists():
        shapes.build(other, 16, val_n=4, test_n=2, seed=5, resolution=32, maxcount=16)
    autoencoder_main(["--resume", str(ae), "--data", str(other), "--new-data"])
    _, after = load_autoencoder(ae)
    assert after.encoder_hash == before.encoder_hash and after.scale != before.scale
    # Named explicitly, the autoencoder's newest checkpoint is another latent space: refused, nothing trained.
    err = _one_line_exit(capsys, prior_main, ["--resume", str(prior), "--autoencoder", str(ae), "--steps", "2"])
    assert "another latent space" in err and "scale" in err and str(ae) in err
    assert ckpt.read_meta(prior)["step"] == 1
    # Left to the record, the prior reads the checkpoint it was trained with, which pruning kept (pinned).
    pipe = TextToImage.from_run(prior, device="cpu")
    assert pipe.latent_space.scale == before.scale
    prior_main(["--resume", str(prior), "--steps", "2"])
    assert ckpt.read_meta(prior)["step"] == 2
    assert "the checkpoint it was trained with" in capsys.readouterr().err


def test_stages_follow_the_data_and_the_prior_follows_its_autoencoder(capsys, root, text_run, tmp_path):
    data64 = root / "shapes64_contract"
    shapes.build(data64, 16, val_n=4, test_n=2, seed=4, resolution=64, maxcount=16)
    # The tiny presets say 32 px; a new run takes the data's 64 unless --set resolution=N is given.
    ae = tmp_path / "ae64"
    autoencoder_main(["--data", str(data64), "--out", str(ae), "--steps", "1", *AE_ARGS])
    assert load_autoencoder(ae)[1].resolution == 64
    autoencoder_main(
        ["--data", str(data64), "--out", str(tmp_path / "ae32"), "--steps", "1", *AE_ARGS, "--set", "resolution=32"]
    )
    assert load_autoencoder(tmp_path / "ae32")[1].resolution == 32
    classifier_main(
        [
            "--data",
            str(data64),
            "--out",
            str(tmp_path / "clf"),
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--set",
            "eval_images=4",
            "--set",
            "model.channels=[8, 8, 8, 8]",
        ]
    )
    assert ckpt.read_meta(tmp_path / "clf")["resolution"] == 64
    # The tiny prior preset with the 64-px autoencoder trains a 64-px prior over 16x16 latents...
    common = ["--data", str(data64), "--autoencoder", str(ae), "--text", str(text_run[0]), "--steps", "1", *PRIOR_ARGS]
    prior_main([*common, "--out", str(tmp_path / "p64")])
    assert load_preset(PriorConfig, PRIOR_PRESETS, "tiny").resolution == 32
    assert ckpt.read_meta(tmp_path / "p64")["latent_space"]["resolution"] == 64
    pipe = TextToImage.from_run(tmp_path / "p64", device="cpu")
    assert pipe.cfg.resolution == 64 and pipe.latent_shape == (4, 16, 16)
    assert pipe("a red circle", n=1, steps=2).shape == (1, 3, 64, 64)
    # ...and a resolution set by hand that disagrees with the autoencoder is refused, naming the flag.
    err = _one_line_exit(capsys, prior_main, [*common, "--out", str(tmp_path / "p32"), "--set", "resolution=32"])
    assert "--set resolution=64" in err and "32-px" in err


# ---------------------------------------------------------------- one way to load a run


@pytest.fixture(scope="module")
def small_runs(root, data, ae_run) -> dict[str, Path]:
    """A 1-step decoder and classifier run (the shared fixtures cover the other stages)."""
    decoder, classifier = root / "contract_decoder", root / "contract_classifier"
    decoder_main(
        [
            "--autoencoder",
            str(ae_run[0]),
            "--data",
            str(data),
            "--out",
            str(decoder),
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--set",
            "eval_images=4",
            "--set",
            "train.ema_decay=0.9",
        ]
    )
    classifier_main(
        [
            "--data",
            str(data),
            "--out",
            str(classifier),
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--set",
            "eval_images=4",
            "--set",
            "model.channels=[8, 8, 8, 8]",
        ]
    )
    return {"decoder": decoder, "classifier": classifier}


BUILDERS = {
    "autoencoder": (AutoencoderConfig, lambda cfg, meta: Autoencoder(cfg.model)),
    "text": (TextStageConfig, lambda cfg, meta: build_clip(load_model_config(cfg.model))),
    "prior": (PriorConfig, lambda cfg, meta: UNet(cfg.model)),
    "decoder": (DecoderStageConfig, lambda cfg, meta: Decoder(cfg.model)),
    "classifier": (ClassifierStageConfig, lambda cfg, meta: Classifier(cfg.model, meta["heads"], cfg.resolution)),
}


@pytest.mark.parametrize("stage", list(BUILDERS))
def test_load_run_round_trip(stage, ae_run, text_run, prior_run, small_runs):
    run = {"autoencoder": ae_run[0], "text": text_run[0], "prior": prior_run[0], **small_runs}[stage]
    config_cls, build = BUILDERS[stage]
    meta = ckpt.read_meta(run, stage)
    for ema in (True, False):
        loaded = load_run(run, stage, config_cls, build, ema=ema)
        file = load_file(str(ckpt.committed_file(run, ckpt.EMA if ema and meta["ema"] else ckpt.MODEL)))
        state = loaded.model.state_dict()
        assert state.keys() == file.keys() and all(torch.equal(state[k], file[k]) for k in file)
        assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
        assert loaded.weights_hash == ckpt.tensors_hash(file) and loaded.meta == meta
    wrong = "text" if stage != "text" else "prior"
    with pytest.raises(CheckpointError, match=f"not a '{wrong}' run"):
        load_run(run, wrong, *BUILDERS[wrong])


def test_load_run_refuses_weights_that_do_not_fit_the_config(ae_run, tmp_path):
    copy = tmp_path / "ae"
    shutil.copytree(ae_run[0], copy)
    config = read_config(copy, AutoencoderConfig)
    wider = Autoencoder(dataclasses.replace(config.model, channels=(8, 16, 32)))
    ckpt.amend(copy, {ckpt.MODEL: wider.state_dict()})
    with pytest.raises(CheckpointError, match="do not fit its config.toml") as exc:
        load_autoencoder(copy)
    assert "\n" not in str(exc.value)


# ---------------------------------------------------------------- paths a run records


def test_recorded_paths_survive_a_move(tmp_path):
    run, data = tmp_path / "tree" / "runs" / "a", tmp_path / "tree" / "data"
    run.mkdir(parents=True)
    data.mkdir()
    record = record_path(data, run)
    assert record == {"path": str(data.resolve()), "from_run": "../../data"}
    assert find_recorded(record, run, "its data", "--data") == str(data.resolve())
    (tmp_path / "tree").rename(tmp_path / "moved")
    moved_run = tmp_path / "moved" / "runs" / "a"
    assert find_recorded(record, moved_run, "its data", "--data") == str((tmp_path / "moved" / "data").resolve())
    with pytest.raises(UserError, match="no longer exists.*--data PATH"):
        find_recorded(record, tmp_path / "elsewhere", "its data", "--data")
    pattern = record_path(tmp_path / "moved" / "data" / "train-{000000..000003}.tar", moved_run)
    assert find_recorded(pattern, moved_run, "its data", "--data") == pattern["path"]


def test_resume_reads_back_only_local_data(capsys, ae_run, tmp_path):
    assert record_path("pipe:curl -s https://host/x.tar", tmp_path) == {"path": "pipe:curl -s https://host/x.tar"}
    copy = tmp_path / "ae"
    shutil.copytree(ae_run[0], copy)
    for source in ("pipe:cat /tmp/x.tar", "https://host/train-{000..009}.tar"):
        ckpt.amend(copy, meta={"data": {"path": source}})
        err = _one_line_exit(capsys, autoencoder_main, ["--resume", str(copy)])
        assert "not a local path" in err and "--data" in err and source in err


def test_runs_work_from_any_directory_and_after_the_tree_moved(monkeypatch, data, ae_run, text_run, tmp_path):
    tree = tmp_path / "tree"
    for name, src in (("ae", ae_run[0]), ("text", text_run[0]), ("data", data)):
        shutil.copytree(src, tree / name)
    monkeypatch.chdir(tree)  # every path given relative to this directory
    prior_main(
        ["--data", "data", "--autoencoder", "ae", "--text", "text", "--out", "prior", "--steps", "1", *PRIOR_ARGS]
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert (
        cli.main(["generate", "a red circle", "--run", str(tree / "prior"), "--n", "1", "--steps", "2", "--out", "gen"])
        == 0
    )
    assert (elsewhere / "gen" / "grid.png").is_file()
    # Move the whole tree: the run finds its stages and data relative to itself.
    moved = tmp_path / "moved"
    tree.rename(moved)
    pipe = TextToImage.from_run(moved / "prior", device="cpu")
    assert pipe.latent_space == load_autoencoder(moved / "ae")[1]
    assert prior_main(["--resume", str(moved / "prior"), "--steps", "2"])["steps"] == 2
    # --autoencoder and --text replace what the run recorded (and are checked like it).
    shutil.move(str(moved / "ae"), str(tmp_path / "ae_elsewhere"))
    with pytest.raises(UserError, match="--autoencoder"):
        TextToImage.from_run(moved / "prior", device="cpu")
    assert (
        cli.main(
            [
                "generate",
                "a red circle",
                "--run",
                str(moved / "prior"),
                "--n",
                "1",
                "--steps",
                "2",
                "--autoencoder",
                str(tmp_path / "ae_elsewhere"),
                "--text",
                str(moved / "text"),
                "--out",
                "gen2",
            ]
        )
        == 0
    )


def test_runs_from_before_latent_spaces_get_a_one_line_answer(ae_run, prior_run, tmp_path):
    ae, prior = tmp_path / "ae", tmp_path / "prior"
    shutil.copytree(ae_run[0], ae)
    shutil.copytree(prior_run[0], prior)
    for run in (ae, prior):
        ckpt.amend(run, meta={"latent_space": None})
    with pytest.raises(CheckpointError, match="resume it with `latentdiff train autoencoder --resume"):
        load_autoencoder(ae)
    with pytest.raises(CheckpointError, match="before priors recorded their latent space") as exc:
        TextToImage.from_run(prior, device="cpu")
    assert "\n" not in str(exc.value)
