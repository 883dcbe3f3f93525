"""torchrun: two processes train the autoencoder and the prior; a one-process run is not resumed by two."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import torch

from latentdiff.autoencoder.load import load_autoencoder
from latentdiff.core import checkpoint as ckpt
from latentdiff.prior.pipeline import TextToImage
from tests.helpers import AE_ARGS, GAN_ARGS, PRIOR_ARGS, SUBPROCESS_TIMEOUT, cli_exit_2


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
    gan = [*GAN_ARGS, "--max-minutes", "30"]
    _torchrun(
        "latentdiff.autoencoder.stage",
        ["--data", str(data), "--out", str(run), "--steps", "3", *AE_ARGS, "--set", "eval_images=4", *gan],
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and math.isfinite(summary["val_psnr"])
    meta = ckpt.read_meta(run, "autoencoder")
    assert meta["step"] == 3 and meta["latent_space"]["scale"] > 0
    model, _ = load_autoencoder(run)  # weights saved once, without DDP's "module." prefix
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Resuming a 2-process run with one process is refused, as 1 -> 2 is (below).
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    assert "trained by 2 process(es) and this resume has 1" in cli_exit_2(
        capsys, ["train", "autoencoder", "--resume", str(run), "--steps", "4"]
    )


def test_torchrun_resume_of_a_one_process_run_is_refused(ae_run, tmp_path):
    run = tmp_path / "one"
    shutil.copytree(ae_run[0], run)
    before = (run / ckpt.CONFIG).read_text()
    proc = _torchrun("latentdiff.autoencoder.stage", ["--resume", str(run), "--steps", "4"], expect=2)
    assert "trained by 1 process(es)" in proc.stderr or "was saved by 1 process(es)" in proc.stderr
    assert (run / ckpt.CONFIG).read_text() == before and ckpt.read_meta(run)["step"] == 3


def test_torchrun_two_process_prior(data, ae_run, text_run, tmp_path):
    run = tmp_path / "ddp_prior"
    _torchrun(
        "latentdiff.prior.stage",
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
            "3",
            *PRIOR_ARGS,
        ],
    )
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert ckpt.read_meta(run, "prior")["step"] == 3
    assert ckpt.committed_file(run, ckpt.EMA).is_file() and (run / "samples.png").is_file()
    images = TextToImage.from_run(run, device="cpu")("a red circle", n=1, steps=2)
    assert images.shape == (1, 3, 32, 32)
