"""train.parallel = "fsdp": the prior and the autoencoder sharded with FSDP2 over 2 gloo processes on the CPU.

A sharded run trains as DDP does, resumes exactly, and writes the checkpoint a single process writes.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from latentdiff.autoencoder.load import load_autoencoder
from latentdiff.core import checkpoint as ckpt
from latentdiff.core.config import load_toml
from latentdiff.core.train import make_optimizer
from latentdiff.prior.config import PriorConfig
from latentdiff.prior.pipeline import TextToImage
from latentdiff.prior.unet import UNet
from tests.helpers import (
    AE_ARGS,
    GAN_ARGS,
    OLD_TINY_AUTOENCODER,
    PRIOR_ARGS,
    RESUME_LR,
    SUBPROCESS_TIMEOUT,
    assert_same_weights,
    cli_exit_2,
    run_weights,
)

FSDP = ["--set", 'train.parallel="fsdp"']
EMA_ON = ["--set", "train.ema_decay=0.9"]


def _torchrun(module: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LATENTDIFF_DEBUG", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", module, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def _same_layout(a: dict, b: dict) -> None:
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}


def _assert_close_weights(a, b, name: str, rtol: float) -> None:
    """One layout (keys, shapes), and weights within rtol of each other (relative norm of the difference).

    Two ways of summing gradients differ in the last bits; Adam turns a gradient that is rounding noise
    (a conv bias before a GroupNorm) into an lr-sized step either way, so elements are not compared.
    """
    wa, wb = run_weights(a, name), run_weights(b, name)
    _same_layout(wa, wb)
    diff = sum(((wa[k] - wb[k]).double() ** 2).sum() for k in wa if wa[k].is_floating_point()).sqrt()
    norm = sum((wb[k].double() ** 2).sum() for k in wb if wb[k].is_floating_point()).sqrt()
    assert diff / norm < rtol, f"{name}: the runs differ by {diff / norm:.3g} (relative)"


def test_fsdp_prior_resumes_exactly_and_writes_a_one_process_checkpoint(data, text_run, prior_run, tmp_path):
    # On the tiny autoencoder's layout before 2026-12-06: with today's (diffusers') layout as the frozen stage, the
    # first resumed step's gradients differ from the straight run's by an ulp or two (losses, latents, RNG and
    # optimizer state bit-identical; measured 2026-12-06; the one-process resume stays bit-exact with it,
    # tests/prior/test_stage.py): the cause is not found, and docs/devices.md says so.
    ae = tmp_path / "ae"
    _torchrun("latentdiff.autoencoder.stage", ["--data", str(data), "--out", str(ae), "--steps", "2", *AE_ARGS,
                                               *OLD_TINY_AUTOENCODER])  # fmt: skip
    base = ["--data", str(data), "--autoencoder", str(ae), "--text", str(text_run[0]), *PRIOR_ARGS]
    # A sample grid at step 2 and 4: the sharded weights are gathered for rank 0 to sample from, mid-run.
    base += [*RESUME_LR, *EMA_ON, "--set", "train.sample_every=2", *FSDP]
    straight, half = tmp_path / "straight", tmp_path / "half"
    _torchrun("latentdiff.prior.stage", [*base, "--out", str(straight), "--steps", "4"])
    _torchrun("latentdiff.prior.stage", [*base, "--out", str(half), "--steps", "2"])
    _torchrun("latentdiff.prior.stage", ["--resume", str(half), "--steps", "4"])
    one = prior_run[0]  # the same network trained by one process
    for name in (ckpt.MODEL, ckpt.EMA):
        assert_same_weights(straight, half, name)  # 2 steps + resume 2 steps = 4 straight, bit for bit
        _same_layout(run_weights(straight, name), run_weights(one, name))
    # The optimizer state is torch's numbered form with full tensors, as one process saves it, and loads there.
    states = [ckpt.load_state(ckpt.committed_file(run, ckpt.STATE))["optimizers"]["model"] for run in (straight, one)]
    assert [g["params"] for g in states[0]["param_groups"]] == [g["params"] for g in states[1]["param_groups"]]
    assert [sorted(g) for g in states[0]["param_groups"]] == [sorted(g) for g in states[1]["param_groups"]]
    cfg = load_toml(PriorConfig, ckpt.committed_file(straight, ckpt.CONFIG))
    opt = make_optimizer(UNet(cfg.model).parameters(), cfg.train)
    opt.load_state_dict(states[0])
    params = [p for group in opt.param_groups for p in group["params"]]
    assert len(states[0]["state"]) == len(params) == len(states[1]["state"])
    for i, p in enumerate(params):
        assert states[0]["state"][i]["exp_avg"].shape == states[1]["state"][i]["exp_avg"].shape == p.shape
        assert int(states[0]["state"][i]["step"]) == 4
    images = TextToImage.from_run(straight, device="cpu")("a red circle", n=1, steps=2)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    assert (straight / "samples" / "step_0000002.png").is_file() and (straight / "samples.png").is_file()


def test_fsdp_autoencoder_with_gan_trains_as_ddp(data, tmp_path):
    """The GAN's adaptive weight differentiates through the decoder's (root-held) last layer; the PatchGAN stays
    replicated. Compared with a DDP run of the same steps (the prior's test above covers the resume)."""
    base = ["--data", str(data), *AE_ARGS, "--set", "eval_images=4", *GAN_ARGS, *EMA_ON, *RESUME_LR]
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    _torchrun("latentdiff.autoencoder.stage", [*base, *FSDP, "--out", str(fsdp), "--steps", "3"])
    _torchrun("latentdiff.autoencoder.stage", [*base, "--out", str(ddp), "--steps", "3"])
    summaries = [json.loads((run / "summary.json").read_text()) for run in (fsdp, ddp)]
    assert summaries[0]["steps"] == 3 and math.isfinite(summaries[0]["val_psnr"])
    for name in (ckpt.MODEL, ckpt.EMA, "discriminator.safetensors"):
        _assert_close_weights(fsdp, ddp, name, rtol=1e-3)
    model, _ = load_autoencoder(fsdp)  # one process, the bare module's keys
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # The latent scale and PSNR were measured on the gathered EMA weights, as the DDP run measured them on its own.
    for key in ("latent_std", "val_psnr"):
        assert math.isclose(summaries[0][key], summaries[1][key], rel_tol=1e-4), key


def test_fsdp_is_refused_for_a_stage_that_does_not_shard(capsys, data, tmp_path):
    err = cli_exit_2(capsys, ["train", "text", "--data", str(data), "--out", str(tmp_path / "t"), *FSDP])
    assert 'train.parallel = "fsdp" shards the prior and the autoencoder only' in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "t").exists()


# ---- the sharding helpers in one 2-process gloo group ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_gathers_back_rank0s_weights_and_computes_in_bf16():
    import tests.core.fsdp_worker as worker  # spawned processes import it: light, unlike this module

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker.check_helpers, args=(_free_port(), results), nprocs=2, join=True)
        results = dict(results)
    for rank in (0, 1):
        r = results[rank]
        assert r["units"] == ["Downsample", "UNetLayer", "Upsample"], r
        assert r["n_units"] == 3 + 2 + 5, r  # down: 2 layers, 1 downsample; mid: 2 layers; up: 2x2 layers, 1 upsample
        assert all(v for k, v in r.items() if k not in ("units", "n_units")), r


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: NCCL collectives")
def test_fsdp_prior_on_cuda(data, ae_run, text_run, tmp_path):
    run = tmp_path / "cuda"
    args = ["--data", str(data), "--autoencoder", str(ae_run[0]), "--text", str(text_run[0]), *PRIOR_ARGS, *FSDP]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={min(2, torch.cuda.device_count())}",
    ]
    cmd += ["-m", "latentdiff.prior.stage", *args, "--out", str(run), "--steps", "2", "--set", 'train.precision="bf16"']
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert ckpt.read_meta(run, "prior")["step"] == 2
    assert all(torch.isfinite(t).all() for t in run_weights(run).values())
