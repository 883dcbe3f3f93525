"""The autoencoder stage end to end on tiny CPU runs: run files, save/load, exact resume, bad samples, time budget."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.autoencoder.load import encoder_hash, load_autoencoder, load_autoencoder_run
from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig
from latentdiff.autoencoder.stage import evaluate_reconstruction
from latentdiff.autoencoder.stage import main as autoencoder_main
from latentdiff.core import checkpoint as ckpt
from latentdiff.core.checkpoint import CheckpointError
from latentdiff.core.config import load_toml
from latentdiff.data.shards import Sample, write_info, write_split
from tests.helpers import (
    AE_ARGS,
    RESUME_LR,
    assert_same_weights,
    decoded,
    run_weights,
    tensorboard_images,
    val_images,
)


def test_autoencoder_run_writes_every_file(ae_run):
    run, summary = ae_run
    for name in ("config.toml", "meta.json", "metrics.jsonl", "summary.json", "reconstructions.png"):
        assert (run / name).is_file(), name
    for name in ("config.toml", "meta.json", "model.safetensors", "state.pt"):  # the checkpoint's own copies
        assert ckpt.committed_file(run, name).is_file(), name
    meta = ckpt.read_meta(run, "autoencoder")
    space = meta["latent_space"]
    assert meta["step"] == 3 and space["scale"] > 0 and space["absmax"] > 0
    assert space["scale"] == pytest.approx(1 / meta["latent_std"])
    assert space["downsampling"] == 4 and space["channels"] == 4 and space["resolution"] == 32
    # The resolved config, overrides included, is what rebuilds the model.
    cfg = load_toml(AutoencoderConfig, run / "config.toml")
    assert cfg.model.channels == (8, 16, 16) and cfg.train.steps == 3 and cfg.train.batch_size == 4
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == summary
    assert all(isinstance(v, (int, float, str)) for v in summary.values()), "summary keys must be flat"
    assert summary["steps"] == 3 and summary["skipped_samples"] == 0
    assert math.isfinite(summary["val_psnr"]) and summary["val_images"] == 8
    assert summary["scale_factor"] == space["scale"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert rows[-1]["final/val_psnr"] == summary["val_psnr"]
    with Image.open(run / "reconstructions.png") as grid:
        assert grid.format == "PNG" and grid.width > grid.height  # one row: inputs then reconstructions
    state = ckpt.load_state(ckpt.committed_file(run, ckpt.STATE))
    assert state["step"] == 3 and set(state["optimizers"]) == {"model"}


def test_grids_are_shown_in_tensorboard(data, tmp_path, prior_run):
    """Every periodic grid and the final one reach TensorBoard's IMAGES tab, the same pictures as the PNGs."""
    run = tmp_path / "ae"
    autoencoder_main(
        ["--data", str(data), "--out", str(run), "--steps", "2", *AE_ARGS, "--set", "train.sample_every=1"]
    )
    shown = tensorboard_images(run)["reconstructions"]
    assert [step for step, *_ in shown] == [1, 2, 2]  # the periodic grids of steps 1 and 2, then the final one
    for (_, width, height, encoded), png in zip(
        shown, [run / "samples" / f"recon_{i:07d}.png" for i in (1, 2)] + [run / "reconstructions.png"]
    ):
        with Image.open(png) as saved:
            assert (width, height) == saved.size
            np.testing.assert_array_equal(decoded(encoded), np.asarray(saved.convert("RGB")))
    ((step, *_, encoded),) = tensorboard_images(prior_run[0])["samples"]  # the prior's final sample grid
    with Image.open(prior_run[0] / "samples.png") as saved:
        assert step == prior_run[1]["steps"]
        np.testing.assert_array_equal(decoded(encoded), np.asarray(saved.convert("RGB")))


def test_autoencoder_checkpoint_load_gives_identical_outputs(ae_run, data, tmp_path):
    run, summary = ae_run
    x = val_images(data)
    model, space = load_autoencoder(run)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert load_autoencoder_run(run).weights_hash == ckpt.tensors_hash(run_weights(run))
    assert space.encoder_hash == encoder_hash(model)
    with torch.no_grad():
        out = model.decode(model.encode(x).mode())
        again, _ = load_autoencoder(run)
        assert torch.equal(again.decode(again.encode(x).mode()), out)
        # Rebuilt by hand from config.toml + model.safetensors: the same function.
        by_hand = Autoencoder(load_toml(AutoencoderConfig, run / "config.toml").model).eval()
        by_hand.load_state_dict(run_weights(run))
        assert torch.equal(by_hand.decode(by_hand.encode(x).mode()), out)
    # The final PSNR in the summary came from the in-memory model; the loaded one reproduces it.
    cfg = load_toml(AutoencoderConfig, run / "config.toml")
    metrics, _ = evaluate_reconstruction(model, str(data), cfg, torch.device("cpu"))
    assert metrics["val_psnr"] == pytest.approx(summary["val_psnr"], rel=1e-6, abs=0)
    # Round trip of new weights: save an edited in-memory model, load it, get its outputs exactly.
    copy = tmp_path / "ae_copy"
    shutil.copytree(run, copy)
    with torch.no_grad():
        for p in by_hand.parameters():
            p.add_(0.01 * torch.randn_like(p))
        edited = by_hand.decode(by_hand.encode(x).mode())
    assert not torch.equal(edited, out)
    ckpt.amend(copy, {ckpt.MODEL: by_hand.state_dict()})
    loaded = load_autoencoder_run(copy).model
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(x).mode()), edited)
    # Its latent space was measured on the old encoder, so later stages may not use it.
    with pytest.raises(CheckpointError, match="not the ones its latent space was measured on"):
        load_autoencoder(copy)


def test_autoencoder_resume_equals_straight_run(data, tmp_path):
    common = ["--data", str(data), *AE_ARGS, *RESUME_LR, "--set", "eval_images=4", "--set", "scale_batches=1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    autoencoder_main(["--out", str(straight), "--steps", "4", *common])
    autoencoder_main(["--out", str(split), "--steps", "2", *common])
    halfway = run_weights(split)
    # --data is not repeated: the run remembers its dataset.
    summary = autoencoder_main(["--resume", str(split), "--steps", "4"])
    assert summary["steps"] == 4 and ckpt.read_meta(split)["step"] == 4
    assert ckpt.load_state(ckpt.committed_file(split, ckpt.STATE))["step"] == 4
    assert_same_weights(straight, split, ckpt.MODEL)
    # Not vacuous: steps 3 and 4 changed the weights.
    assert any(not torch.equal(halfway[k], v) for k, v in run_weights(split).items())
    # The latent scale is measured from the same weights, so it is the same too.
    assert summary["scale_factor"] == json.loads((straight / "summary.json").read_text())["scale_factor"]


def test_corrupt_sample_is_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)

    def good(n: int, prefix: str) -> list[Sample]:
        return [
            Sample(
                key=f"{prefix}{i:03d}",
                image=Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
                caption=f"noise {i}",
            )
            for i in range(n)
        ]

    data = tmp_path / "data"
    train = good(8, "a") + [Sample(key="broken", image=b"\x89PNG\r\n\x1a\n not an image", caption="a broken file")]
    train += good(8, "b")
    write_split(data, "train", train, maxcount=100)
    write_split(data, "val", good(4, "v"))
    write_info(data, source="test", resolution=32, splits={"train": 17, "val": 4})
    # 6 batches of 4 = 24 decoded samples > the 16 good ones of an epoch: the broken one was read.
    summary = autoencoder_main(
        [
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "6",
            *AE_ARGS,
            "--set",
            "eval_images=4",
            "--set",
            "scale_batches=1",
        ]
    )
    assert summary["steps"] == 6
    assert summary["skipped_samples"] >= 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_samples"] == summary["skipped_samples"]
    assert ckpt.load_state(ckpt.committed_file(tmp_path / "run", ckpt.STATE))["skipped"] == summary["skipped_samples"]


def test_max_minutes_stops_cleanly_with_a_checkpoint(data, tmp_path):
    run = tmp_path / "budget"
    summary = autoencoder_main(
        [
            "--data",
            str(data),
            "--out",
            str(run),
            "--steps",
            "1000",
            "--max-minutes",
            "0.001",
            *AE_ARGS,
            "--set",
            "eval_images=4",
            "--set",
            "scale_batches=1",
        ]
    )
    done = summary["steps"]
    assert done < 1000
    assert json.loads((run / "summary.json").read_text())["steps"] == done
    meta = ckpt.read_meta(run, "autoencoder")
    assert meta["step"] == done and meta["latent_space"]["scale"] > 0
    assert ckpt.load_state(ckpt.committed_file(run, ckpt.STATE))["step"] == done
    assert ckpt.committed_file(run, ckpt.MODEL).is_file()
    # The stopped run resumes from where it stopped.
    again = autoencoder_main(["--resume", str(run), "--steps", str(done + 1), "--max-minutes", "0"])
    assert again["steps"] == done + 1
