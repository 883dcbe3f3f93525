"""What a run does on each fault: non-finite numbers, signals, a second writer, a resume that does not fit.

Each test is a small case a user could hit, run through a stage's `main` on tiny CPU settings.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentdiff.autoencoder import stage as ae_stage
from latentdiff.autoencoder.losses import AutoencoderLoss
from latentdiff.autoencoder.model import Autoencoder, AutoencoderModelConfig
from latentdiff.core import checkpoint as ckpt
from latentdiff.core import runtime as runtime_module
from latentdiff.core.faults import NonFiniteError, RunLock
from latentdiff.core.runtime import Runtime
from latentdiff.core.train import LossJump, LossWatch, Run, TrainConfig, lr_factor
from latentdiff.decoder.losses import PatchDiscriminator
from latentdiff.evaluation.classifier_stage import main as classifier_main
from tests.helpers import AE_ARGS, GAN_ARGS, PRIOR_ARGS, RESUME_LR, cli_exit_2  # noqa: E402

SMALL = [*AE_ARGS, "--set", "eval_images=4", "--set", "scale_batches=1"]


def _ae(args: list[str]) -> dict:
    return ae_stage.main(args)


def _exit_code(argv: list[str], main=ae_stage.main) -> int:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code


def _finite_weights(run: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(ckpt.committed_file(run, ckpt.MODEL))).values())


def _nan_at(monkeypatch, steps: set[int]) -> None:
    """Make the autoencoder's loss NaN at the given (0-based) steps, as a bad batch or an overflow would."""
    forward = AutoencoderLoss.forward

    def poisoned(self, x, x_hat, posterior, step, last_layer=None):
        terms = forward(self, x, x_hat, posterior, step, last_layer)
        if step in steps:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(AutoencoderLoss, "forward", poisoned)


# ---------------------------------------------------------------- non-finite numbers


@pytest.mark.parametrize("flag", [["--lr", "inf"], ["--set", "loss.kl_weight=nan"]])
def test_non_finite_config_value_is_refused_before_anything_is_written(flag, data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    run = tmp_path / "run"
    assert _exit_code(["--data", str(data), "--out", str(run), "--steps", "3", *flag, *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a finite number" in err
    assert not run.exists()


def test_a_non_finite_step_is_skipped_and_counted(data, tmp_path, monkeypatch):
    _nan_at(monkeypatch, {1})
    run = tmp_path / "run"
    summary = _ae(["--data", str(data), "--out", str(run), "--steps", "4", *SMALL, "--set", "train.log_every=1"])
    assert summary["steps"] == 4 and summary["nonfinite_steps"] == 1
    assert json.loads((run / "summary.json").read_text())["nonfinite_steps"] == 1
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["nonfinite_steps"] for m in logged if "nonfinite_steps" in m][:4] == [0, 1, 1, 1]
    assert _finite_weights(run) and math.isfinite(summary["scale_factor"])


def test_non_finite_steps_in_a_row_stop_the_run_and_keep_the_last_checkpoint(data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    _nan_at(monkeypatch, {3, 4, 5})
    run = tmp_path / "run"
    code = _exit_code(
        [
            "--data",
            str(data),
            "--out",
            str(run),
            "--steps",
            "8",
            *SMALL,
            "--set",
            "train.ckpt_every=2",
            "--set",
            "train.max_nonfinite_steps=2",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "step 5:" in err[-1] and "2 steps in a row" in err[-1]
    assert ckpt.read_meta(run)["step"] == 4  # saved after steps 3 (good) and 4 (skipped, weights unchanged)
    assert _finite_weights(run) and not (run / "summary.json").exists()


def test_non_finite_weights_are_never_saved(tmp_path):
    model = torch.nn.Linear(2, 2)
    rt = Runtime(torch.device("cpu"))
    run = Run(tmp_path, "test", types.SimpleNamespace(train=TrainConfig()), rt, resuming=False)
    run.begin({"model": model}, {"model": torch.optim.AdamW(model.parameters())})
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="weights of model are not finite"):
        run.checkpoint(1)
    assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob(ckpt.STATE))
    run.close()


def test_begin_returns_the_schedule_and_advance_moves_it_on_for_a_skipped_step_too(tmp_path):
    cfg = TrainConfig(steps=10, lr=1.0, warmup_steps=4)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    run = Run(tmp_path, "test", types.SimpleNamespace(train=cfg), Runtime(torch.device("cpu")), resuming=False)
    scheduler = run.begin({"model": model}, {"model": opt})
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_factor(0, cfg)) == pytest.approx(0.25)
    loss = torch.tensor(float("nan"))
    assert not run.finite(0, loss, torch.tensor(1.0))  # skipped: no optimizer step, but the schedule moves on
    run.advance(images=3, skipped=2)
    assert scheduler.get_last_lr()[0] == opt.param_groups[0]["lr"] == pytest.approx(lr_factor(1, cfg))
    assert run.skipped == 2 and run._images == 3
    run.close()


def test_a_non_finite_latent_scale_is_an_error():
    model = Autoencoder(AutoencoderModelConfig(channels=(8, 16, 16)))
    with torch.no_grad():
        next(model.encoder.parameters()).fill_(float("nan"))
    batches = iter([{"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)}])  # as the loader gives
    with pytest.raises(NonFiniteError, match="latent std is nan"):
        ae_stage.measure_latents(model, batches, 1, torch.device("cpu"))


# ---------------------------------------------------------------- signals, sample grids, concurrent writers


def test_sigterm_saves_and_the_resumed_run_equals_a_straight_one(data, tmp_path, monkeypatch, capsys):
    common = ["--data", str(data), *SMALL, *RESUME_LR]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    _ae(["--out", str(straight), "--steps", "5", *common])
    count, before = Run.advance, signal.getsignal(signal.SIGTERM)

    def count_and_signal(self, n, skipped=0):  # a preemption arriving in the middle of step 2 (0-based 1)
        count(self, n, skipped)
        if self.done == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Run, "advance", count_and_signal)
    assert _exit_code(["--out", str(stopped), "--steps", "5", *common]) == 128 + signal.SIGTERM
    assert f"stopped at step 2; resume with --resume {stopped}" in capsys.readouterr().err
    assert ckpt.read_meta(stopped)["step"] == 2
    assert ckpt.load_state(ckpt.committed_file(stopped, ckpt.STATE))["step"] == 2
    monkeypatch.setattr(Run, "advance", count)
    assert _ae(["--resume", str(stopped), "--steps", "5"])["steps"] == 5
    a, b = (load_file(str(ckpt.committed_file(r, ckpt.MODEL))) for r in (straight, stopped))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are the run's only


def test_ctrl_c_in_the_loop_saves_and_exits_130(data, tmp_path, monkeypatch, capsys):
    count = Run.advance
    # What the run must restore: Python's default_int_handler, or SIG_IGN where the suite was started in the
    # background by a shell without job control (which ignores SIGINT in its children).
    before = signal.getsignal(signal.SIGINT)

    def count_and_interrupt(self, n, skipped=0):
        count(self, n, skipped)
        if self.done == 0:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Run, "advance", count_and_interrupt)
    run = tmp_path / "run"
    assert _exit_code(["--data", str(data), "--out", str(run), "--steps", "5", *SMALL]) == 130
    assert "stopped at step 1; resume with --resume" in capsys.readouterr().err
    assert ckpt.read_meta(run)["step"] == 1 and signal.getsignal(signal.SIGINT) is before


def test_a_failing_sample_grid_does_not_end_the_run(data, tmp_path, monkeypatch):
    from latentdiff.decoder import losses as recon  # where the loops' periodic grids are saved

    save_grid = recon.save_grid

    def broken(images, path, nrow=None):
        if "recon_" in str(path):
            raise OSError("disk full")
        return save_grid(images, path, nrow)

    monkeypatch.setattr(recon, "save_grid", broken)
    summary = _ae(
        ["--data", str(data), "--out", str(tmp_path / "run"), "--steps", "3", *SMALL, "--set", "train.sample_every=1"]
    )
    assert summary["steps"] == 3 and summary["sample_errors"] == 3


def test_a_second_writer_is_refused_naming_the_holder(data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    holder = RunLock(run)
    holder.acquire()  # another process training into the same directory
    try:
        assert _exit_code(["--data", str(data), "--out", str(run), "--steps", "2", *SMALL]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"in use by pid {os.getpid()}" in err
        assert not (run / ckpt.CONFIG).exists() and not (run / "metrics.jsonl").exists()
    finally:
        holder.release()
    assert _ae(["--data", str(data), "--out", str(run), "--steps", "1", *SMALL])["steps"] == 1  # free again


# ---------------------------------------------------------------- resume that validates first


@pytest.fixture()
def short_run(ae_run, tmp_path) -> Path:
    run = tmp_path / "copy"
    shutil.copytree(ae_run[0], run)
    return run


def test_resume_with_another_model_shape_is_refused_and_writes_nothing(short_run, capsys, monkeypatch):
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)

    def files() -> dict[str, bytes]:
        kept = [p for p in short_run.iterdir() if p.is_file() and not p.name.startswith("run.lock")]
        return {p.name: p.read_bytes() for p in kept}

    before = files()
    assert _exit_code(["--resume", str(short_run), "--steps", "4", "--set", "model.latent_channels=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.latent_channels: 4 -> 8" in err
    assert files() == before
    assert _ae(["--resume", str(short_run), "--steps", "4"])["steps"] == 4  # the run still resumes


def test_optimizer_hyper_parameters_follow_the_config_on_resume(data, tmp_path):
    run = tmp_path / "run"
    gan = list(GAN_ARGS)
    _ae(["--data", str(data), "--out", str(run), "--steps", "2", *SMALL, *gan])
    _ae(
        [
            "--resume",
            str(run),
            "--steps",
            "3",
            "--set",
            "train.weight_decay=0.05",
            "--set",
            "train.betas=[0.8, 0.95]",
            "--set",
            "loss.disc_lr=3e-5",
        ]
    )
    groups = ckpt.load_state(ckpt.committed_file(run, ckpt.STATE))["optimizers"]
    assert [g["weight_decay"] for g in groups["model"]["param_groups"]] == [0.05, 0.0]
    assert all(tuple(g["betas"]) == (0.8, 0.95) for g in groups["model"]["param_groups"])
    assert groups["discriminator"]["param_groups"][0]["lr"] == 3e-5


def test_switching_ema_on_at_resume_starts_it_from_the_current_weights(short_run):
    assert not ckpt.read_meta(short_run)["ema"]
    summary = _ae(["--resume", str(short_run), "--steps", "3", "--set", "train.ema_decay=0.9"])
    assert summary["steps"] == 3 and ckpt.read_meta(short_run)["ema"]
    # Nothing trained after the switch (the run was at step 3): the average is the weights themselves.
    a, b = (load_file(str(ckpt.committed_file(short_run, name))) for name in (ckpt.MODEL, ckpt.EMA))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_switching_the_discriminator_on_at_resume_starts_it_fresh(short_run, capsys):
    gan = list(GAN_ARGS)
    assert _ae(["--resume", str(short_run), "--steps", "4", *gan])["steps"] == 4
    assert "discriminator starts from its initial weights" in capsys.readouterr().out
    assert ckpt.committed_file(short_run, "discriminator.safetensors").is_file()


def test_budgeted_cosine_continues_from_the_recorded_progress(tmp_path):
    cfg = TrainConfig(steps=1000, lr=1.0, lr_decay="cosine", max_minutes=60.0)
    run = Run(tmp_path, "test", types.SimpleNamespace(train=cfg), Runtime(torch.device("cpu")), resuming=True)
    run._progress0 = 0.9  # an earlier invocation spent its budget 90% of the way down the cosine
    run.start_step = 10
    model = torch.nn.Linear(2, 2)
    scheduler = run.lr_schedule(torch.optim.AdamW(model.parameters(), lr=1.0))
    # By steps alone step 10 is 1% of the way (lr near its peak); the recorded progress wins.
    assert scheduler.get_last_lr()[0] == pytest.approx(lr_factor(10, cfg, 0.9), rel=1e-3)
    assert scheduler.get_last_lr()[0] < 0.2
    assert run._last_progress >= 0.9


def test_budgeted_run_records_its_progress(data, tmp_path):
    run = tmp_path / "run"
    _ae(
        [
            "--data",
            str(data),
            "--out",
            str(run),
            "--steps",
            "3",
            "--max-minutes",
            "30",
            *SMALL,
            "--set",
            'train.lr_decay="cosine"',
            "--set",
            "train.warmup_steps=0",
        ]
    )
    assert 0.0 < ckpt.load_state(ckpt.committed_file(run, ckpt.STATE))["lr_progress"] <= 1.0


# ---------------------------------------------------------------- collectives


def test_collectives_run_on_the_runtime_device(monkeypatch, tmp_path):
    seen = []

    def all_reduce(tensor, op=None):
        seen.append(tensor.device)

    monkeypatch.setattr(runtime_module.dist, "all_reduce", all_reduce)
    rt = Runtime(torch.device("cpu"), rank=0, world_size=2)  # as under torchrun, without a process group
    run = Run(tmp_path, "test", types.SimpleNamespace(train=TrainConfig(max_minutes=1.0)), rt, resuming=False)
    run._should_stop(types.SimpleNamespace(received=None))  # the budget and signal vote
    run.finite(0, torch.tensor(1.0), torch.tensor(1.0))  # the non-finite vote
    assert seen and all(d == rt.device for d in seen)


def test_classifier_resume_keeps_its_heads(tmp_path, data):
    run = tmp_path / "clf"
    classifier_main(
        ["--data", str(data), "--out", str(run), "--steps", "2", "--batch-size", "8", "--set", "eval_images=8"]
    )
    assert classifier_main(["--resume", str(run), "--steps", "3"])["steps"] == 3


def _discriminator_rank(rank: int, world_size: int, init_file: str, out: str) -> None:
    """One of two gloo processes: a few autoencoder steps with the PatchGAN on, each rank on its own data."""
    import torch.distributed as dist

    from latentdiff.autoencoder.model import AutoencoderLossConfig
    from latentdiff.decoder.losses import discriminator_backward

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(rank)  # as Runtime.setup seeds each rank: the discriminators start apart
    rt = Runtime(torch.device("cpu"), rank=rank, world_size=world_size)
    model = Autoencoder(AutoencoderModelConfig(channels=(8, 16, 16)))
    rt.broadcast_module(model)  # DDP would do this for the autoencoder itself
    loss_fn = AutoencoderLoss(
        AutoencoderLossConfig(disc_weight=0.5, disc_start=0, disc_channels=8, disc_layers=2), average=rt.all_reduce_mean
    )
    opt_d = loss_fn.discriminator_optimizer()
    rt.broadcast_module(loss_fn.discriminator)
    run = Run(Path(out), "autoencoder", types.SimpleNamespace(train=TrainConfig()), rt, resuming=False)
    weights = []
    for step in range(3):
        x = torch.rand(2, 3, 32, 32) * 2 - 1  # a different batch on each rank
        x_hat, posterior = model(x)
        terms = loss_fn(x, x_hat, posterior, step, model.decoder.last_layer)
        weights.append(terms["gan_weight"][0].item())
        if run.finite(step, *discriminator_backward(loss_fn, opt_d, x, x_hat, run), part="discriminator"):
            opt_d.step()
    torch.save({"disc": loss_fn.discriminator.state_dict(), "gan_weight": weights}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_processes_keep_one_discriminator(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_discriminator_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["disc"].keys() == b["disc"].keys()
    assert all(torch.equal(a["disc"][k], b["disc"][k]) for k in a["disc"])
    assert a["gan_weight"] == b["gan_weight"]  # the adaptive weight is averaged over ranks
    start = PatchDiscriminator(3, 8, 2).state_dict()  # not vacuous: the steps moved it
    assert any(not torch.equal(start[k], a["disc"][k]) for k in start if start[k].shape == a["disc"][k].shape)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _rank_of(pid: int) -> int | None:
    try:
        env = dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e)
    except OSError:
        return None
    return int(env["RANK"]) if "RANK" in env else None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_sigterm_to_one_torchrun_rank_stops_both_at_the_same_step(data, tmp_path):
    import subprocess
    import sys
    import time

    from tests.helpers import SUBPROCESS_TIMEOUT

    run = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "latentdiff.autoencoder.stage",
        "--data",
        str(data),
        "--out",
        str(run),
        "--steps",
        "100000",
        *SMALL,
        "--set",
        "train.log_every=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        metrics = run / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):  # training has started
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        rank1 = [pid for pid in _children(proc.pid) if _rank_of(pid) == 1]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGTERM)  # only rank 1 is told; rank 0 must stop with it
        _, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    step = ckpt.read_meta(run)["step"]
    state = ckpt.load_state(ckpt.committed_file(run, ckpt.STATE))
    assert state["step"] == step and state["world_size"] == 2
    assert ckpt.load_state(ckpt.committed_file(run, "rng_rank1.pt"))["step"] == step  # both ranks saved it
    assert f"stopped at step {step}; resume with --resume {run}" in err


# ---------------------------------------------------------------- a loss that jumps and stays up


def test_loss_watch_names_the_step_where_a_loss_jumps_and_stays_up():
    watch = LossWatch(3.0)
    noisy = [0.4, 0.2, 0.1, 0.06, 0.05, 0.03, 0.025, 0.032, 0.022, 0.026, 0.024, 0.03, 0.021, 0.027]
    assert [watch.see(25 * (i + 1), v) for i, v in enumerate(noisy)] == [None] * len(noisy)
    jumps = [watch.see(25 * (i + 15), v) for i, v in enumerate([0.2, 0.3, 0.31, 0.28, 0.3])]
    # The lowest median of 4 is 0.025 (0.022, 0.026, 0.024, 0.03 up to step 275); the second high log lifts the
    # median to (0.027 + 0.2) / 2, above 3 x 0.025.
    assert jumps[0] is None and jumps[2:] == [None] * 3
    jump = jumps[1]
    assert isinstance(jump, LossJump) and jump.step == 400 and jump.best_step == 275
    assert jump.best == pytest.approx(0.025) and jump.loss == pytest.approx((0.027 + 0.2) / 2)
    assert "step 400: the loss jumped" in jump.message(4) and f"{jump.ratio:.1f} times" in jump.message(4)


def test_loss_watch_ignores_one_bad_batch_and_sees_a_second_jump_after_recovering():
    watch = LossWatch(3.0)
    seen = [watch.see(i + 1, v) for i, v in enumerate([0.03] * 6 + [5.0] + [0.03] * 5)]
    assert seen == [None] * 12  # one spike: the median of 4 never moves
    seen = [watch.see(i + 13, v) for i, v in enumerate([0.3] * 4 + [0.03] * 4 + [0.3] * 4)]
    assert [s is not None for s in seen] == [False, True, False, False, False, False, False, False] + [
        False,
        True,
        False,
        False,
    ]
    assert watch.see(30, float("nan")) is None and watch.see(31, float("inf")) is None
    with pytest.raises(ValueError, match="factor above 1"):
        LossWatch(1.0)


def test_a_prior_whose_loss_jumps_is_warned_about_logged_and_counted(
    data, ae_run, text_run, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    from latentdiff.prior import stage as prior_stage

    loss = prior_stage.prior_loss
    steps = iter(range(10**6))

    def jumping(*args, **kwargs):  # from the 7th step on, ten times the loss: a divergence as the log shows it
        denoising, grounding = loss(*args, **kwargs)
        return denoising * (10.0 if next(steps) >= 6 else 1.0), grounding

    run = tmp_path / "prior"
    argv = ["--data", str(data), "--autoencoder", str(ae_run[0]), "--text", str(text_run[0]), "--out", str(run),
            "--steps", "12", *PRIOR_ARGS, "--set", "train.log_every=1", "--set", "train.sample_every=0"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prior_stage, "prior_loss", jumping)
        summary = prior_stage.main(argv)
    assert summary["loss_jumps"] == 1
    assert json.loads((run / "summary.json").read_text())["loss_jumps"] == 1
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    flagged = [m["step"] for m in logged if "loss_jump" in m]
    assert len(flagged) == 1 and 8 <= flagged[0] <= 9  # the 2nd or 3rd log after the jump (the median of 4)
    assert "the loss jumped" in capsys.readouterr().out
    # Off with train.loss_jump = 0: nothing watched, nothing counted.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prior_stage, "prior_loss", jumping)
        steps = iter(range(10**6))
        quiet = prior_stage.main([*argv[:7], str(tmp_path / "quiet"), *argv[8:], "--set", "train.loss_jump=0"])
    assert "loss_jumps" not in quiet
    message = cli_exit_2(capsys, ["train", "prior", *argv[:7], str(tmp_path / "bad"), *argv[8:], "--set",
                                  "train.loss_jump=0.5"])  # fmt: skip
    assert "train.loss_jump is a factor above 1" in message and not (tmp_path / "bad").exists()
