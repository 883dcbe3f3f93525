"""Every stage end to end on tiny CPU runs: run files, save/load, exact resume, torchrun, bad input, generation.

One tiny dataset and one tiny autoencoder, text and prior run are built once (module fixtures,
through each stage's `main`) and shared; tests that need their own run make a few-step one.
Everything runs on one thread: on two shared cores, two OpenMP threads were measured 100x
slower per convolution than one when another process held a core.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from latentdiff.autoencoder.load import encoder_hash, load_autoencoder, load_autoencoder_run
from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig
from latentdiff.autoencoder.stage import evaluate_reconstruction
from latentdiff.autoencoder.stage import main as autoencoder_main
from latentdiff.core import checkpoint as ckpt
from latentdiff.core.checkpoint import CheckpointError
from latentdiff.core.config import load_toml
from latentdiff.core.logger import to_uint8
from latentdiff.core.runtime import Runtime
from latentdiff.data.reader import make_loader
from latentdiff.data.shards import Sample, write_info, write_split
from latentdiff.prior.latent_cache import LatentCache
from latentdiff.prior.pipeline import GenerationSettings, TextToImage
from latentdiff.prior.stage import main as prior_main
from latentdiff.scripts import cli
from latentdiff.text.encoder import TextEncoder
from latentdiff.text.model import build_clip, load_model_config
from latentdiff.text.sources import load_text_encoder
from latentdiff.text.stage import TextStageConfig, evaluate
from latentdiff.text.tokens import PromptTruncatedWarning, build_tokenizer

from conftest import AE_ARGS, PRIOR_ARGS, RESUME_LR, SUBPROCESS_TIMEOUT, N_TRAIN  # noqa: E402
from helpers import decoded, tensorboard_images, write_text_run  # noqa: E402


def _weights(run: Path, name: str = ckpt.MODEL) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.committed_file(run, name)))


def _assert_same_weights(a: Path, b: Path, name: str) -> None:
    wa, wb = _weights(a, name), _weights(b, name)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{name}: {len(differ)} of {len(wa)} tensors differ, e.g. {differ[:3]}"


def _val_images(data: Path, n: int = 4) -> torch.Tensor:
    loader = make_loader(str(data), "val", n, shuffle=False, repeat=False, resolution=32, rank=0, world_size=1)
    return next(iter(loader))["image"]


def _exit_2(capsys, argv: list[str]) -> str:
    """Run `latentdiff ARGV`, expect exit code 2, return what it printed on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------- autoencoder


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
    autoencoder_main(["--data", str(data), "--out", str(run), "--steps", "2", *AE_ARGS, "--set", "train.sample_every=1"])
    shown = tensorboard_images(run)["reconstructions"]
    assert [step for step, *_ in shown] == [1, 2, 2]  # the periodic grids of steps 1 and 2, then the final one
    for (_, width, height, encoded), png in zip(shown, [run / "samples" / f"recon_{i:07d}.png" for i in (1, 2)]
                                                + [run / "reconstructions.png"]):
        with Image.open(png) as saved:
            assert (width, height) == saved.size
            np.testing.assert_array_equal(decoded(encoded), np.asarray(saved.convert("RGB")))
    ((step, *_, encoded),) = tensorboard_images(prior_run[0])["samples"]  # the prior's final sample grid
    with Image.open(prior_run[0] / "samples.png") as saved:
        assert step == prior_run[1]["steps"]
        np.testing.assert_array_equal(decoded(encoded), np.asarray(saved.convert("RGB")))


def test_autoencoder_checkpoint_load_gives_identical_outputs(ae_run, data, tmp_path):
    run, summary = ae_run
    x = _val_images(data)
    model, space = load_autoencoder(run)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert load_autoencoder_run(run).weights_hash == ckpt.tensors_hash(_weights(run))
    assert space.encoder_hash == encoder_hash(model)
    with torch.no_grad():
        out = model.decode(model.encode(x).mode())
        again, _ = load_autoencoder(run)
        assert torch.equal(again.decode(again.encode(x).mode()), out)
        # Rebuilt by hand from config.toml + model.safetensors: the same function.
        by_hand = Autoencoder(load_toml(AutoencoderConfig, run / "config.toml").model).eval()
        by_hand.load_state_dict(_weights(run))
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
    halfway = _weights(split)
    # --data is not repeated: the run remembers its dataset.
    summary = autoencoder_main(["--resume", str(split), "--steps", "4"])
    assert summary["steps"] == 4 and ckpt.read_meta(split)["step"] == 4
    assert ckpt.load_state(ckpt.committed_file(split, ckpt.STATE))["step"] == 4
    _assert_same_weights(straight, split, ckpt.MODEL)
    # Not vacuous: steps 3 and 4 changed the weights.
    assert any(not torch.equal(halfway[k], v) for k, v in _weights(split).items())
    # The latent scale is measured from the same weights, so it is the same too.
    assert summary["scale_factor"] == json.loads((straight / "summary.json").read_text())["scale_factor"]


def test_corrupt_sample_is_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)

    def good(n: int, prefix: str) -> list[Sample]:
        return [Sample(key=f"{prefix}{i:03d}", image=Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
                       caption=f"noise {i}") for i in range(n)]

    data = tmp_path / "data"
    train = good(8, "a") + [Sample(key="broken", image=b"\x89PNG\r\n\x1a\n not an image", caption="a broken file")]
    train += good(8, "b")
    write_split(data, "train", train, maxcount=100)
    write_split(data, "val", good(4, "v"))
    write_info(data, source="test", resolution=32, splits={"train": 17, "val": 4})
    # 6 batches of 4 = 24 decoded samples > the 16 good ones of an epoch: the broken one was read.
    summary = autoencoder_main(["--data", str(data), "--out", str(tmp_path / "run"), "--steps", "6", *AE_ARGS,
                                "--set", "eval_images=4", "--set", "scale_batches=1"])
    assert summary["steps"] == 6
    assert summary["skipped_samples"] >= 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_samples"] == summary["skipped_samples"]
    assert ckpt.load_state(ckpt.committed_file(tmp_path / "run", ckpt.STATE))["skipped"] == summary["skipped_samples"]


def test_max_minutes_stops_cleanly_with_a_checkpoint(data, tmp_path):
    run = tmp_path / "budget"
    summary = autoencoder_main(["--data", str(data), "--out", str(run), "--steps", "1000", "--max-minutes", "0.001",
                                *AE_ARGS, "--set", "eval_images=4", "--set", "scale_batches=1"])
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


# ---------------------------------------------------------------- torchrun


def _torchrun(module: str, args: list[str], expect: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LATENTDIFF_DEBUG", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", module, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert (proc.returncode == 0) == (expect == 0), f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def test_torchrun_two_process_autoencoder(data, tmp_path, capsys, monkeypatch):
    run = tmp_path / "ddp_ae"
    # With the PatchGAN on from the first step and a time budget: its collectives run on every rank.
    gan = ["--set", "loss.disc_weight=0.5", "--set", "loss.disc_start=0", "--set", "loss.disc_channels=8",
           "--set", "loss.disc_layers=2", "--max-minutes", "30"]
    _torchrun("latentdiff.autoencoder.stage",
              ["--data", str(data), "--out", str(run), "--steps", "3", *AE_ARGS, "--set", "eval_images=4", *gan])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and math.isfinite(summary["val_psnr"])
    meta = ckpt.read_meta(run, "autoencoder")
    assert meta["step"] == 3 and meta["latent_space"]["scale"] > 0
    model, _ = load_autoencoder(run)  # weights saved once, without DDP's "module." prefix
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Resuming a 2-process run with one process is refused, as 1 -> 2 is (below).
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    assert "trained by 2 process(es) and this resume has 1" in _exit_2(
        capsys, ["train", "autoencoder", "--resume", str(run), "--steps", "4"])


def test_torchrun_resume_of_a_one_process_run_is_refused(ae_run, tmp_path):
    run = tmp_path / "one"
    shutil.copytree(ae_run[0], run)
    before = (run / ckpt.CONFIG).read_text()
    proc = _torchrun("latentdiff.autoencoder.stage", ["--resume", str(run), "--steps", "4"], expect=2)
    assert "trained by 1 process(es)" in proc.stderr or "was saved by 1 process(es)" in proc.stderr
    assert (run / ckpt.CONFIG).read_text() == before and ckpt.read_meta(run)["step"] == 3


def test_torchrun_two_process_prior(data, ae_run, text_run, tmp_path):
    run = tmp_path / "ddp_prior"
    _torchrun("latentdiff.prior.stage",
              ["--data", str(data), "--autoencoder", str(ae_run[0]), "--text", str(text_run[0]), "--out", str(run),
               "--steps", "3", *PRIOR_ARGS])
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert ckpt.read_meta(run, "prior")["step"] == 3
    assert ckpt.committed_file(run, ckpt.EMA).is_file() and (run / "samples.png").is_file()
    images = TextToImage.from_run(run, device="cpu")("a red circle", n=1, steps=2)
    assert images.shape == (1, 3, 32, 32)


# ---------------------------------------------------------------- bad input


def test_unknown_config_key_names_the_key(capsys, monkeypatch, data, tmp_path):
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    err = _exit_2(capsys, ["train", "autoencoder", "--data", str(data), "--out", str(tmp_path / "a"),
                           "--set", "model.widht=3"])
    assert "widht" in err and "channels" in err  # the misspelt key and the keys it could have been


def test_missing_data_directory(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    missing = tmp_path / "no_such_data"
    err = _exit_2(capsys, ["train", "autoencoder", "--data", str(missing), "--out", str(tmp_path / "a"),
                           "--steps", "1", *AE_ARGS])
    assert str(missing) in err and "latentdiff data" in err
    assert not (tmp_path / "a" / ckpt.META).exists()  # no half-made run that looks finished
    err = _exit_2(capsys, ["train", "autoencoder", "--out", str(tmp_path / "b")])
    assert "--data" in err


def test_resuming_a_run_of_another_stage(capsys, monkeypatch, text_run, ae_run):
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    err = _exit_2(capsys, ["train", "autoencoder", "--resume", str(text_run[0]), "--steps", "5"])
    assert "'text' run" in err and "autoencoder" in err
    err = _exit_2(capsys, ["train", "prior", "--resume", str(ae_run[0]), "--steps", "5"])
    assert "'autoencoder' run" in err and "prior" in err


def test_out_pointing_at_an_existing_run(capsys, monkeypatch, ae_run, data):
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    run = ae_run[0]
    config, weights = (run / "config.toml").read_text(), ckpt.committed_file(run, ckpt.MODEL).read_bytes()
    err = _exit_2(capsys, ["train", "autoencoder", "--data", str(data), "--out", str(run), "--steps", "1"])
    assert f"--resume {run}" in err
    assert (run / "config.toml").read_text() == config and ckpt.committed_file(run, ckpt.MODEL).read_bytes() == weights


def test_prior_with_the_wrong_kind_of_run(capsys, monkeypatch, data, ae_run, text_run, tmp_path):
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    ae, text = str(ae_run[0]), str(text_run[0])
    err = _exit_2(capsys, ["train", "prior", "--data", str(data), "--autoencoder", text, "--text", text,
                           "--out", str(tmp_path / "p1"), "--steps", "1", *PRIOR_ARGS])
    assert text in err and "'text' run" in err and "train autoencoder" in err
    err = _exit_2(capsys, ["train", "prior", "--data", str(data), "--autoencoder", ae, "--text", ae,
                           "--out", str(tmp_path / "p2"), "--steps", "1", *PRIOR_ARGS])
    assert ae in err and "'autoencoder' run" in err and "train text" in err and "openclip:" in err
    err = _exit_2(capsys, ["train", "prior", "--data", str(data), "--text", text, "--out", str(tmp_path / "p3")])
    assert "--autoencoder" in err


# ---------------------------------------------------------------- text


def test_text_run_loads_and_matches_the_trained_model(text_run, data):
    run, summary = text_run
    assert summary["steps"] == 3
    assert 0.0 <= summary["val_zero_shot_accuracy"] <= 1.0
    meta = ckpt.read_meta(run, "text")
    assert meta["ema"] is True and load_toml(TextStageConfig, run / "config.toml").model == "clip-tiny"
    encoder = load_text_encoder(run)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    # By hand from the EMA weights: the same embeddings, bit for bit.
    by_hand = build_clip(load_model_config("clip-tiny"))
    by_hand.load_state_dict(_weights(run, ckpt.EMA))
    # Frozen like the loaded one: MultiheadAttention takes another (equal up to rounding) path otherwise.
    by_hand.eval().requires_grad_(False)
    prompts = ["a red circle", "a small blue square on the left", ""]
    out = encoder.encode(prompts)
    with torch.no_grad():
        tokens = encoder.tokenize(prompts)
        assert torch.equal(out.pooled, by_hand.encode_text(tokens))
        reference = TextEncoder(by_hand, build_tokenizer(load_model_config("clip-tiny"))).encode(prompts)
    assert torch.equal(out.states, reference.states) and torch.equal(out.mask, reference.mask)
    assert torch.isfinite(out.states).all()
    # The summary was measured on the in-memory EMA model; the loaded one gives the same figures.
    again = evaluate(encoder, str(data), TextStageConfig(eval_images=8))
    assert again == pytest.approx({k: summary[k] for k in again})


# ---------------------------------------------------------------- prior and generation


def test_prior_run_records_its_stages(prior_run, ae_run, text_run):
    run, summary = prior_run
    assert summary["steps"] == 3 and (run / "samples.png").is_file()
    meta = ckpt.read_meta(run, "prior")
    _, space = load_autoencoder(ae_run[0])
    assert meta["latent_space"] == space.to_dict() and space.latent_shape == (4, 8, 8)
    assert meta["autoencoder"]["path"] == str(ae_run[0].resolve())
    assert meta["ema"] is True and ckpt.committed_file(run, ckpt.EMA).is_file()
    assert Path(meta["text"]["source"]) == text_run[0].resolve()


@pytest.mark.parametrize("cache_latents", [False, True], ids=["encode", "cache"])
def test_prior_resume_equals_straight_run(cache_latents, data, ae_run, text_run, tmp_path):
    common = ["--data", str(data), "--autoencoder", str(ae_run[0]), "--text", str(text_run[0]), *PRIOR_ARGS,
              *RESUME_LR, "--set", "train.ema_decay=0.9"] + (["--cache-latents"] if cache_latents else [])
    straight, split = tmp_path / "straight", tmp_path / "split"
    prior_main(["--out", str(straight), "--steps", "4", *common])
    prior_main(["--out", str(split), "--steps", "2", *common])
    halfway = _weights(split, ckpt.EMA)
    # Nothing but the steps: the run remembers its data, stages and --cache-latents.
    assert prior_main(["--resume", str(split), "--steps", "4"])["steps"] == 4
    _assert_same_weights(straight, split, ckpt.MODEL)
    _assert_same_weights(straight, split, ckpt.EMA)
    assert any(not torch.equal(halfway[k], v) for k, v in _weights(split, ckpt.EMA).items())
    assert ckpt.read_meta(split)["cache_latents"] is cache_latents


def test_cache_latents_training_and_loader(data, ae_run, text_run, tmp_path):
    run = tmp_path / "cached"
    summary = prior_main(["--data", str(data), "--autoencoder", str(ae_run[0]), "--text", str(text_run[0]),
                          "--out", str(run), "--steps", "2", "--cache-latents", *PRIOR_ARGS])
    assert summary["steps"] == 2
    cache_dir = run / "latent_cache"
    info = json.loads((cache_dir / "cache.json").read_text())
    ae, space = load_autoencoder(ae_run[0])
    assert info["count"] == N_TRAIN and info["key"]["encoder_hash"] == space.encoder_hash
    assert (cache_dir / "latents.safetensors").is_file() and (cache_dir / "captions.json").is_file()
    # What the cache holds is the posterior of each training image, in shard order.
    latents = load_file(str(cache_dir / "latents.safetensors"))
    captions = json.loads((cache_dir / "captions.json").read_text())["captions"]
    loader = make_loader(str(data), "train", 16, shuffle=False, repeat=False, drop_last=False, resolution=32,
                         rank=0, world_size=1)
    batches = list(loader)
    with torch.no_grad():
        post = [ae.encode(b["image"]) for b in batches]
    torch.testing.assert_close(latents["mean"], torch.cat([p.mean for p in post]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latents["std"], torch.cat([p.std for p in post]), rtol=1e-5, atol=1e-5)
    assert captions == [c for b in batches for c in b["caption"]]
    # Loading again reuses the files, and the loader is a pure function of (seed, rank, world_size).
    before = (cache_dir / "latents.safetensors").stat().st_mtime_ns
    cache = LatentCache.build(ae, str(data), cache_dir, 32, Runtime(torch.device("cpu")))
    assert (cache_dir / "latents.safetensors").stat().st_mtime_ns == before and len(cache) == N_TRAIN

    def take(n: int, **kw) -> list[dict]:
        it = cache.loader(8, **kw)
        return [next(it) for _ in range(n)]

    first, second = take(10, seed=3), take(10, seed=3)  # 10 batches of 8: more than one epoch of 64
    for a, b in zip(first, second):
        assert torch.equal(a["mean"], b["mean"]) and torch.equal(a["std"], b["std"]) and a["caption"] == b["caption"]
    other_seed = take(1, seed=4)[0]
    assert not torch.equal(other_seed["mean"], first[0]["mean"])
    flat = latents["mean"].flatten(1)
    for batch in first[:2]:  # each cached caption travels with its own latent
        for c, m in zip(batch["caption"], batch["mean"]):
            same = (flat == m.flatten()).all(dim=1).nonzero().flatten().tolist()
            assert c in [captions[j] for j in same]
    # Two ranks split an epoch (4 batches of 8 each): together they hold every cached latent once.
    shares = [torch.cat([b["mean"] for b in take(4, seed=3, rank=r, world_size=2)]) for r in (0, 1)]
    assert sorted(map(tuple, torch.cat(shares).flatten(1).tolist())) == sorted(map(tuple, flat.tolist()))


def test_generation_is_seeded(pipe):
    prompts = ["a red circle", "a small blue square on the left"]
    a = pipe(prompts, n=2, steps=3, seed=1)
    assert a.shape == (4, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(pipe(prompts, n=2, steps=3, seed=1), a)
    assert not torch.equal(pipe(prompts, n=2, steps=3, seed=2), a)


def test_guidance_scale_one_is_the_conditional_model(pipe):
    plain = pipe("a red circle", n=2, steps=2, guidance=1.0, seed=0)
    assert torch.isfinite(plain).all()
    assert not torch.equal(pipe("a blue cross", n=2, steps=2, guidance=1.0, seed=0), plain)  # the text matters
    # At w = 1 the unconditional branch has weight 0, so the negative prompt cannot matter...
    assert torch.equal(pipe("a red circle", n=2, steps=2, guidance=1.0, seed=0, negative_prompt="a blue cross"), plain)
    # ...while at w = 3 it does.
    guided = pipe("a red circle", n=2, steps=2, guidance=3.0, seed=0)
    assert not torch.equal(pipe("a red circle", n=2, steps=2, guidance=3.0, seed=0, negative_prompt="a blue cross"),
                           guided)


def test_empty_and_very_long_prompts_generate(pipe):
    empty = pipe("", n=1, steps=2)
    with pytest.warns(PromptTruncatedWarning):  # 10,010 characters, far beyond the 32-token context
        long = pipe("a red circle " * 770, n=1, steps=2)
    assert empty.shape == long.shape == (1, 3, 32, 32)
    assert torch.isfinite(empty).all() and torch.isfinite(long).all()
    with pytest.raises(ValueError, match="steps"):
        pipe("a red circle", steps=100_000)


def test_generate_cli_writes_images_grid_and_settings(prior_run, ae_run, pipe, tmp_path):
    out = tmp_path / "gen"
    prompts = ["a red circle", "a green triangle"]
    assert cli.main(["generate", *prompts, "--run", str(prior_run[0]), "--n", "2", "--steps", "3", "--seed", "7",
                     "--guidance", "2.5", "--sampler", "euler", "--negative", "blurry", "--out", str(out)]) == 0
    settings = json.loads((out / "settings.json").read_text())
    fields = {f for f in GenerationSettings.__dataclass_fields__}
    assert fields | {"files", "seeds", "command"} == set(settings)
    assert settings["seeds"] == [7, 8, 9, 10]  # image k is made from seed + k
    assert settings["prompts"] == prompts and settings["n"] == 2 and settings["steps"] == 3
    assert settings["seed"] == 7 and settings["guidance"] == 2.5 and settings["sampler"] == "euler"
    assert settings["negative_prompt"] == "blurry" and settings["run"] == str(prior_run[0])
    assert settings["clip_x0"] == pytest.approx(ckpt.read_meta(ae_run[0])["latent_space"]["absmax"])
    assert len(settings["files"]) == 4 and all((out / f).is_file() for f in settings["files"])
    with Image.open(out / "grid.png") as grid:
        assert grid.width > 2 * 32 and grid.height > 2 * 32
    # The files hold exactly what the pipeline makes for the same settings (PNG rounding aside).
    images = pipe(prompts, n=2, steps=3, seed=7, guidance=2.5, sampler="euler", negative_prompt="blurry")
    expected = to_uint8(images).permute(0, 2, 3, 1).numpy().astype(int)  # (N, H, W, 3)
    for i, name in enumerate(settings["files"]):
        with Image.open(out / name) as png:
            got = np.asarray(png.convert("RGB"), dtype=int)
        assert np.abs(got - expected[i]).max() <= 1, name


def test_mismatched_autoencoder_is_refused(prior_run, ae_run, other_ae_run):
    run = prior_run[0]
    assert TextToImage.from_run(run, device="cpu", autoencoder=ae_run[0]).latent_shape == (4, 8, 8)
    with pytest.raises(CheckpointError, match="encoder_hash") as exc:
        TextToImage.from_run(run, device="cpu", autoencoder=other_ae_run)
    assert "another latent space" in str(exc.value) and str(other_ae_run) in str(exc.value)


def test_mismatched_text_encoder_is_refused(prior_run, tmp_path):
    config = load_model_config("clip-tiny")
    torch.manual_seed(123)
    other = write_text_run(tmp_path / "other_text", build_clip(config))
    with pytest.raises(CheckpointError, match="text encoder") as exc:
        TextToImage.from_run(prior_run[0], device="cpu", text=other)
    assert str(other) in str(exc.value) and "hash" in str(exc.value)
