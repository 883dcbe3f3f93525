"""The prior stage end to end and generation: recorded stages, exact resume, latent cache,
seeded and CLI generation, mismatched runs refused."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from latentdiff.autoencoder.load import load_autoencoder
from latentdiff.core import checkpoint as ckpt
from latentdiff.core.checkpoint import CheckpointError
from latentdiff.core.pixels import from_uint8, to_uint8
from latentdiff.core.runtime import Runtime
from latentdiff.data.reader import make_loader
from latentdiff.prior.latent_cache import LatentCache
from latentdiff.prior.pipeline import GenerationSettings, TextToImage
from latentdiff.prior.stage import main as prior_main
from latentdiff.scripts import cli
from latentdiff.text.model import build_clip, load_model_config
from latentdiff.text.tokens import PromptTruncatedWarning
from tests.helpers import N_TRAIN, PRIOR_ARGS, RESUME_LR, assert_same_weights, run_weights, write_text_run


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
    common = [
        "--data",
        str(data),
        "--autoencoder",
        str(ae_run[0]),
        "--text",
        str(text_run[0]),
        *PRIOR_ARGS,
        *RESUME_LR,
        "--set",
        "train.ema_decay=0.9",
    ] + (["--cache-latents"] if cache_latents else [])
    straight, split = tmp_path / "straight", tmp_path / "split"
    prior_main(["--out", str(straight), "--steps", "4", *common])
    prior_main(["--out", str(split), "--steps", "2", *common])
    halfway = run_weights(split, ckpt.EMA)
    # Nothing but the steps: the run remembers its data, stages and --cache-latents.
    assert prior_main(["--resume", str(split), "--steps", "4"])["steps"] == 4
    assert_same_weights(straight, split, ckpt.MODEL)
    assert_same_weights(straight, split, ckpt.EMA)
    assert any(not torch.equal(halfway[k], v) for k, v in run_weights(split, ckpt.EMA).items())
    assert ckpt.read_meta(split)["cache_latents"] is cache_latents


def test_cache_latents_training_and_loader(data, ae_run, text_run, tmp_path):
    run = tmp_path / "cached"
    summary = prior_main(
        [
            "--data",
            str(data),
            "--autoencoder",
            str(ae_run[0]),
            "--text",
            str(text_run[0]),
            "--out",
            str(run),
            "--steps",
            "2",
            "--cache-latents",
            *PRIOR_ARGS,
        ]
    )
    assert summary["steps"] == 2
    cache_dir = run / "latent_cache"
    info = json.loads((cache_dir / "cache.json").read_text())
    ae, space = load_autoencoder(ae_run[0])
    assert info["count"] == N_TRAIN and info["key"]["encoder_hash"] == space.encoder_hash
    assert (cache_dir / "latents.safetensors").is_file() and (cache_dir / "captions.json").is_file()
    # What the cache holds is the posterior of each training image, in shard order.
    latents = load_file(str(cache_dir / "latents.safetensors"))
    captions = json.loads((cache_dir / "captions.json").read_text())["captions"]
    loader = make_loader(
        str(data), "train", 16, shuffle=False, repeat=False, drop_last=False, resolution=32, rank=0, world_size=1
    )
    batches = list(loader)
    with torch.no_grad():
        post = [ae.encode(from_uint8(b["image"])) for b in batches]
    torch.testing.assert_close(latents["mean"], torch.cat([p.mean for p in post]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latents["std"], torch.cat([p.std for p in post]), rtol=1e-5, atol=1e-5)
    assert captions == [c for b in batches for c in b["caption"]]
    # ... and each sample's json beside its caption (the grounding loss reads the objects from it)
    assert json.loads((cache_dir / "captions.json").read_text())["meta"] == [m for b in batches for m in b["meta"]]
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


def test_the_latent_cache_encoding_counts_in_the_time_budget(data, ae_run, text_run, tmp_path, monkeypatch):
    build = LatentCache.build

    def slow_build(cls, *args, **kwargs):  # an encoding that takes 1.5 s, more than the whole budget (0.6 s)
        time.sleep(1.5)
        return build(*args, **kwargs)

    monkeypatch.setattr(LatentCache, "build", classmethod(slow_build))
    common = ["--data", str(data), "--autoencoder", str(ae_run[0]), "--text", str(text_run[0]), "--steps", "50",
              "--max-minutes", "0.01", *PRIOR_ARGS]  # fmt: skip
    assert prior_main([*common, "--cache-latents", "--out", str(tmp_path / "cached")])["steps"] == 0
    # The same budget without the cache trains: the clock is the invocation's, and only the cache spent it.
    assert prior_main([*common, "--out", str(tmp_path / "direct")])["steps"] > 0


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
    assert not torch.equal(
        pipe("a red circle", n=2, steps=2, guidance=3.0, seed=0, negative_prompt="a blue cross"), guided
    )


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
    assert (
        cli.main(
            [
                "generate",
                *prompts,
                "--run",
                str(prior_run[0]),
                "--n",
                "2",
                "--steps",
                "3",
                "--seed",
                "7",
                "--guidance",
                "2.5",
                "--sampler",
                "euler",
                "--negative",
                "blurry",
                "--out",
                str(out),
            ]
        )
        == 0
    )
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
