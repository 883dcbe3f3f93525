"""What the tests share that is not a fixture: the tiny-run arguments, runs written by hand where training one
would be slow, and checks several parts' tests make (same weights, a `latentdiff` command refused with exit 2)."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from latentdiff.core import checkpoint as ckpt
from latentdiff.core.config import dumps_toml, to_dict
from latentdiff.core.pixels import from_uint8
from latentdiff.data.reader import make_loader
from latentdiff.scripts import cli
from latentdiff.text.stage import TextStageConfig

N_TRAIN = 64  # shapes training images, in 4 shards of 16 (so 2 ranks each read their own shards)
AE_ARGS = [
    "--batch-size",
    "4",
    "--set",
    "eval_images=8",
    "--set",
    "scale_batches=2",
    "--set",
    "model.channels=[8, 16, 16]",
]
# A tiny PatchGAN, on from the first step (its optimizer, adaptive weight and collectives run at once).
GAN_ARGS = [
    "--set",
    "loss.disc_weight=0.5",
    "--set",
    "loss.disc_start=0",
    "--set",
    "loss.disc_channels=8",
    "--set",
    "loss.disc_layers=2",
]
PRIOR_ARGS = [
    "--batch-size",
    "4",
    # The tiny preset's lr (3e-3) was raced at batch 128 over ~500 steps; at batch 4 it can push a
    # few-step prior to outputs that clip to the same image for every prompt.
    "--lr",
    "1e-3",
    "--set",
    "model.channels=[16, 32]",
    "--set",
    "model.num_res_blocks=1",
    "--set",
    "sampling.steps=2",
    "--set",
    "sampling.per_prompt=1",
]
# The tiny autoencoder preset's layout before 2026-12-06 (its own padding, decoder depth and upsampling, gcd(32, width)
# GroupNorm groups), which runs trained then record; the preset is diffusers' AutoencoderKL layout since.
OLD_TINY_AUTOENCODER = ["--set", 'model.downsample_padding="symmetric"', "--set", "model.decoder_res_blocks=1",
                        "--set", "model.upsample_narrows=true", "--set", "model.norm_groups=32"]  # fmt: skip
# The lr must not depend on train.steps for "2 steps, then resume to 4" to equal "4 steps": with
# cosine decay the first invocation (steps=2) would decay faster. Warm-up crosses the resume point.
RESUME_LR = ["--set", "train.warmup_steps=3", "--set", 'train.lr_decay="constant"']
SUBPROCESS_TIMEOUT = 300  # seconds; a hung process group fails the test instead of the suite


def run_weights(run: Path, name: str = ckpt.MODEL) -> dict[str, torch.Tensor]:
    """The tensors of `name` in `run`'s newest committed checkpoint."""
    return load_file(str(ckpt.committed_file(run, name)))


def assert_same_weights(a: Path, b: Path, name: str) -> None:
    """Runs `a` and `b` hold bit-identical tensors in `name` (the check behind every "resume equals straight")."""
    wa, wb = run_weights(a, name), run_weights(b, name)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{name}: {len(differ)} of {len(wa)} tensors differ, e.g. {differ[:3]}"


def val_images(data: Path, n: int = 4) -> torch.Tensor:
    """The first `n` validation images of a shapes data set at 32 px, (n, 3, 32, 32) in [-1, 1]."""
    loader = make_loader(str(data), "val", n, shuffle=False, repeat=False, resolution=32, rank=0, world_size=1)
    return from_uint8(next(iter(loader))["image"])


def cli_exit_2(capsys, argv: list[str]) -> str:
    """Run `latentdiff ARGV`, expect exit code 2, return what it printed on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def write_text_run(run_dir: Path, model: open_clip.CLIP, model_name: str = "clip-tiny") -> Path:
    """A text-stage run holding `model`'s weights as one committed checkpoint of step 0, as `latentdiff train text`
    writes one (config.toml names the open_clip model config; no EMA)."""
    meta = {"stage": "text", "format_version": ckpt.FORMAT_VERSION, "step": 0, "ema": False}
    config = dumps_toml(to_dict(TextStageConfig(model=model_name)))
    staging = ckpt.staging_dir(run_dir, 0)
    ckpt.save_weights(staging / ckpt.MODEL, model.state_dict())
    ckpt.write_text(staging / ckpt.CONFIG, config)
    ckpt.write_json(staging / ckpt.META, meta)
    ckpt.commit(run_dir, staging, 0, keep=1)
    ckpt.write_text(run_dir / ckpt.CONFIG, config)
    ckpt.write_json(run_dir / ckpt.META, meta)
    return run_dir


def tensorboard_images(run_dir: Path) -> dict[str, list]:
    """The images of a run's TensorBoard event files, by tag: [(step, width, height, encoded PNG)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    return {
        tag: [(e.step, e.width, e.height, e.encoded_image_string) for e in events.Images(tag)]
        for tag in events.Tags()["images"]
    }


def decoded(encoded: bytes):
    """An encoded image (PNG bytes) as an (H, W, 3) uint8 array."""
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


def run_killed_child(main, argv: list[str], kill_at: int | None, count_file: Path | None = None) -> int:
    """Run `main(argv)` in a forked process that SIGKILLs itself at its `kill_at`-th event; its exit code.

    Events: every step (each Run.every call), before and after every file's bytes are written (before
    its fsync and rename), and before every rename: so kills land mid-step, mid-file, between the files
    of a save, between commit and pruning, and mid-prune. kill_at None: run to the end; count_file, when
    given, then receives the number of events the run made (to draw kill points from).
    """
    import multiprocessing
    import os
    import signal

    from latentdiff.core import train as core_train

    def child() -> None:
        count = 0

        def event() -> None:
            nonlocal count
            count += 1
            if kill_at is not None and count >= kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        real_replace, real_atomic, real_every = os.replace, ckpt.atomic_write, core_train.Run.every

        def replace(*a, **k):
            event()
            return real_replace(*a, **k)

        def atomic_write(path, write):
            event()
            real_atomic(path, lambda tmp: (write(tmp), event()))

        def every(self, interval, step):
            event()
            return real_every(self, interval, step)

        os.replace, ckpt.atomic_write, core_train.Run.every = replace, atomic_write, every
        main(argv)
        if count_file is not None:
            Path(count_file).write_text(str(count))

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode is not None, "a training child hung"
    return proc.exitcode


def train_text_on_scenes(
    tmp_path: Path, *sets: str, holdout: tuple[str, ...] = ()
) -> tuple[dict, list[dict], list[str]]:
    """A 3-step `train text` on 48 scenes at 32 px with `--set` overrides: (summary, logged metrics, the flags)."""
    import json

    from latentdiff.data import scenes
    from latentdiff.text.stage import main as text_main

    scenes.build(tmp_path / "scenes", 48, val_n=12, test_n=6, seed=0, resolution=32, holdout=list(holdout))
    flags = ["--steps", "3", "--batch-size", "8", "--set", "eval_images=12", "--set", "train.log_every=1"]
    overrides = [word for value in sets for word in ("--set", value)]
    summary = text_main(["--data", str(tmp_path / "scenes"), "--out", str(tmp_path / "run"), *flags, *overrides])
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return summary, logged, flags


def rendered_scenes(task: str, n: int = 24, resolution: int = 64) -> tuple[list, torch.Tensor]:
    """n scenes of `task` drawn with seed 0 (data/scenes.py) and their images, (n, 3, H, W) uint8."""
    import numpy as np

    from latentdiff.data.scenes import render, sample_scene

    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, resolution, task) for _ in range(n)]
    images = [torch.from_numpy(np.array(render(s.objects, resolution))).permute(2, 0, 1) for s in scenes]
    return scenes, torch.stack(images)


def random_cross_attention_unet(generator: torch.Generator):
    """A two-level UNet with cross-attention at both (context width 8), weights drawn from `generator` (std 0.2, so
    its attention maps are far from uniform), in eval mode."""
    from latentdiff.prior.unet import UNet, UNetConfig

    cfg = UNetConfig(in_channels=4, channels=(16, 32), num_res_blocks=1, attention_levels=(0, 1), heads=2,
                     context_dim=8, norm_groups=8)  # fmt: skip
    model = UNet(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model
