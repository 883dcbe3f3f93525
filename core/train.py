"""What every training stage shares: the run directory, resume, LR schedule, budget, faults, checkpoints.

A stage's `train` is one loop that reads straight down (nanoGPT's and DiT's train.py are the
model); this module supplies the parts around it, written once:

    run = Run.start(args, StageConfig, PRESETS, stage="prior", from_run=FROM_RUN)
    ...build model, optimizer, EMA...
    run.begin({"model": model}, {"model": opt}, ema, meta=meta)  # checks and restores when resuming
    scheduler = run.lr_schedule(opt)
    batches = run.batches(loader)
    for step in run.steps():  # stops at train.steps, the time budget or a signal; saves at the end
        batch = next(batches)
        lr = scheduler.get_last_lr()[0]
        loss = ...forward and loss...
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip or math.inf)
        if run.finite(step, loss, grad_norm):  # a non-finite step is skipped and counted
            opt.step()
        scheduler.step()
        ema.update(model)
        if run.every(tcfg.log_every, step): run.log(step, {...})
        if run.every(tcfg.sample_every, step): run.sample(step, lambda: ...)
        if run.every(tcfg.ckpt_every, step): run.checkpoint(step + 1)
    summary = {"steps": run.done, ...evaluation of ema.final(model)...}
    return run.finish(summary)  # summary.json; releases the run directory's lock

The flags (`add_train_args`) live in core/flags.py, what happens on each fault in core/faults.py.
"""

from __future__ import annotations

import argparse
import errno
import math
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

from . import checkpoint as ckpt
from .config import (Decay, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, dumps_toml, load_preset,
                     load_toml, to_dict)
from .ema import EMA
from .errors import Stopped, UserError, cli_errors
from .faults import NonFiniteError, RunLock, StopSignals, nonfinite_weights
from .flags import cli_overrides, config_changes, fill_from_run, require
from .logger import MetricLogger, progress
from .runtime import Precision, Runtime, rng_state, set_rng_state


@dataclass(frozen=True)
class TrainConfig:
    steps: PositiveInt = 1000  # optimizer steps; the run ends at `steps` or `max_minutes`, whichever comes first
    max_minutes: NonNegativeFloat = 0.0  # wall-clock budget for this invocation (0: none); stops cleanly and saves
    batch_size: PositiveInt = 64  # per rank
    lr: PositiveFloat = 1e-3  # peak learning rate (AdamW)
    warmup_steps: NonNegativeInt = 0  # linear warm-up from 0 to lr
    lr_decay: Literal["constant", "cosine"] = "constant"  # cosine: to 10% of lr at `steps`
    weight_decay: NonNegativeFloat = 0.0  # AdamW decoupled weight decay, not applied to norms and biases
    betas: tuple[Decay, Decay] = (0.9, 0.999)  # AdamW betas
    grad_clip: NonNegativeFloat = 1.0  # max global gradient norm (0: no clipping)
    ema_decay: Decay = 0.0  # EMA of the weights (0: none)
    ema_warmup: bool = True  # ramp the EMA decay up as min(ema_decay, (1+n)/(10+n)) over the first n updates
    seed: int = 0  # one seed for weights, data order and noise
    num_workers: NonNegativeInt = 0  # data-loader worker processes per rank
    precision: Precision = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32" or "bf16"
    log_every: NonNegativeInt = 25  # steps between metric lines (0: none)
    sample_every: NonNegativeInt = 500  # steps between sample/reconstruction grids (0: only at the end)
    ckpt_every: NonNegativeInt = 500  # steps between checkpoints (0: none; always one at the end)
    max_nonfinite_steps: PositiveInt = 10  # non-finite losses or gradient norms in a row before the run stops
    keep_checkpoints: PositiveInt = 2  # newest complete checkpoints kept in RUN/checkpoints


def lr_factor(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """The learning rate at `step` as a fraction of the peak: linear warm-up, then constant or cosine to 10%.

    progress: the fraction of the run done after warm-up, 0..1 (default: by steps). A run with
    a time budget passes the larger of the step and time fractions, so the decay completes
    when the budget ends rather than at a step count it never reaches.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "cosine":
        if progress is None:
            progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, max(0.0, progress))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0  # "constant"


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and convolutions only (not norms, biases, embeddings' scales)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


_OPEN: list["Run"] = []  # runs holding their directory's lock; stage_main releases them however train ends


class Run:
    """A stage's run directory and everything a loop needs around it."""

    def __init__(self, path: Path, stage: str, config: Any, runtime: Runtime, resuming: bool,
                 recorded: dict | None = None, changes: list[str] | None = None, lock: RunLock | None = None):
        self.path = path
        self.stage = stage
        self.config = config
        self.runtime = runtime
        self.resuming = resuming
        self.recorded = recorded  # the run's meta.json when resuming, else None
        self._changes = changes or []
        self._lock = lock
        self.logger: MetricLogger | None = None
        self.skipped = 0  # samples the data reader skipped (bad images, empty captions)
        self.nonfinite_steps = 0  # optimizer steps skipped because a loss or gradient norm was not finite
        self.sample_errors = 0  # periodic sample grids that failed (the run went on)
        self.start_step = 0
        self.done = 0  # steps done so far: the step the next checkpoint records
        self._in_a_row: dict[str, int] = {}
        self._saved_step: int | None = None
        self._tracked: tuple = ({}, {}, None)
        self.meta: dict = {}
        self._progress0: float | None = None  # clock-following LR progress reached by earlier invocations
        self._last_progress: float | None = None
        self._signals: StopSignals | None = None
        self._t0 = time.monotonic()
        self._images = 0
        self._bar = None
        self._data_position: dict | None = None  # this rank's loader positions, from the checkpoint resumed
        self._positions: dict[int, tuple[int, int]] = {}  # worker -> (epoch, raw samples read) of batches used
        self._workers = 1

    # ---- set-up ---------------------------------------------------------------------------
    @classmethod
    def start(cls, args: argparse.Namespace, config_cls: type, preset_dir: Path, stage: str,
              from_run: dict[str, str] | None = None, required: tuple[str, ...] = ("data",)) -> "Run":
        """Resolve the config (fresh from a preset, or the run's own on --resume), lock the directory.

        On --resume the flags in `from_run` that the user left out are read back from the run,
        and nothing is written until `begin` has checked the checkpoint against the config.
        """
        overrides = cli_overrides(args)
        recorded, changes = None, []
        if args.resume:
            path = Path(args.resume)
            recorded = ckpt.read_meta(path, stage)
            fill_from_run(args, recorded, {"data": "data", **(from_run or {})})
            old = load_toml(config_cls, ckpt.committed_file(path, ckpt.CONFIG))
            config = load_toml(config_cls, ckpt.committed_file(path, ckpt.CONFIG), overrides)
            changes = config_changes(to_dict(old), to_dict(config))
        else:
            if not args.out:
                raise UserError("--out RUN is required (or --resume RUN to continue a run)")
            path = Path(args.out)
            if (path / ckpt.META).exists() or ckpt.has_checkpoint(path):
                raise UserError(f"{path} already holds a run; pass --resume {path} to continue it, or another --out")
            config = load_preset(config_cls, preset_dir, args.preset, overrides)
        require(args, required, stage)
        runtime = Runtime.setup(config.train.seed, config.train.precision, getattr(args, "device", None))
        lock, error = None, None
        if runtime.is_main:
            path.mkdir(parents=True, exist_ok=True)
            lock = RunLock(path)
            try:
                lock.acquire()
            except UserError as e:
                lock, error = None, e
        if runtime.any_rank(error is not None)[0]:
            raise error or UserError(f"{path} is in use by another process (see rank 0)")
        run = cls(path, stage, config, runtime, bool(args.resume), recorded, changes, lock)
        _OPEN.append(run)
        if not run.resuming:
            run._write_config()
        runtime.barrier()
        return run

    def _write_config(self) -> None:
        if self.runtime.is_main:
            ckpt.write_text(self.path / ckpt.CONFIG, dumps_toml(to_dict(self.config)))

    def begin(self, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
              ema: EMA | None = None, meta: dict | None = None) -> int:
        """Name what the run checkpoints; when resuming, check and load the last checkpoint. Returns the step.

        A resume is checked before anything is written: weights that do not fit the resolved
        config (a changed model shape) or another number of processes are refused with one
        line, and config.toml stays as it was. After loading, each optimizer's
        hyper-parameters (weight decay, betas, a constant lr) are the resolved config's, not
        the ones saved in its state. A module or EMA that the checkpoint does not have (EMA or
        the discriminator switched on at resume) starts from its current weights.

        Raises CheckpointError (one line) when the checkpoint does not fit; the run is untouched.
        """
        self._tracked = (modules, optimizers, ema)
        self.meta = dict(meta or {})
        if self.resuming:
            self.start_step = self._resume(modules, optimizers, ema)
            self._write_config()
            self.runtime.barrier()
        else:
            self.restore(modules, optimizers, ema)  # loads nothing; clears what an interrupted first save left
        self.done = self.start_step
        self._saved_step = self.start_step if self.resuming else None
        self.logger = MetricLogger(self.path, enabled=self.runtime.is_main)
        return self.start_step

    def _resume(self, modules, optimizers, ema) -> int:
        hyper = {name: [{k: v for k, v in g.items() if k not in ("params", "initial_lr")} for g in opt.param_groups]
                 for name, opt in optimizers.items()}
        present = {name: m for name, m in modules.items() if name == "model" or ckpt.committed_file(
            self.path, f"{name}.safetensors").exists()}
        fresh = [name for name in modules if name not in present]
        with_ema = ema is not None and ema.enabled and bool(self.recorded.get("ema"))
        try:
            step, state = self.restore(present, {k: o for k, o in optimizers.items() if k in present},
                                       ema if with_ema else None)
        except ckpt.CheckpointError:
            raise
        except (RuntimeError, ValueError, KeyError) as e:
            if not isinstance(e, KeyError) and "state dict" not in str(e).lower().replace("_", " "):
                raise  # not load_state_dict refusing the weights or groups (say, out of memory)
            changed = "; ".join(self._changes) or "no config change"
            first = str(e).strip().splitlines()[-1].strip().rstrip(".")[:200]
            raise ckpt.CheckpointError(f"cannot resume {self.path}: its checkpoint does not fit the config "
                                       f"({changed}): {first}. Start a new run with --out instead") from None
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.runtime.world_size:
            raise ckpt.CheckpointError(
                f"{self.path} was trained by {saved_world} process(es) and this resume has "
                f"{self.runtime.world_size}: each process's data shard and random stream are part of the run; "
                f"resume it with {saved_world} (torchrun --nproc_per_node={saved_world})")
        for name, opt in optimizers.items():
            for group, values in zip(opt.param_groups, hyper[name]):
                group.update(values)
        notes = [f"{name} starts from its initial weights" for name in fresh]
        if ema is not None and ema.enabled and not with_ema:
            ema.restart(modules["model"])
            notes.append(f"EMA switched on: it starts from the weights of step {step}")
        for note in notes:
            self._note(f"resume: {note}")
        self.skipped = int(state.get("skipped", 0))
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        progress0 = state.get("lr_progress")
        self._progress0 = float(progress0) if progress0 is not None else None
        return step

    # ---- checkpoints ----------------------------------------------------------------------
    def save(self, step: int, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
             ema: EMA | None = None, meta: dict | None = None, state: dict | None = None) -> None:
        """Write one checkpoint (weights, EMA, training state, meta, config) and commit it as a unit.

        Every rank writes into the same staging folder, the others their own RNG state (each rank
        draws its own noise, so a resume restores every rank's stream); after a barrier the main
        rank commits it (core.checkpoint.commit) and refreshes the root meta.json people read.
        A failed write (a full disk) removes the staging folder and raises CheckpointError; the
        previous checkpoint stays the newest.
        """
        from .runtime import unwrap

        staging = ckpt.staging_dir(self.path, step)
        full_meta = {}
        try:
            if not self.runtime.is_main:
                ckpt.save_state(staging / f"rng_rank{self.runtime.rank}.pt",
                                {"step": step, "rng": rng_state(), "data_position": self._data_state()})
            else:
                for name, module in modules.items():
                    fname = ckpt.MODEL if name == "model" else f"{name}.safetensors"
                    ckpt.save_weights(staging / fname, unwrap(module).state_dict(), {"step": step})
                if ema is not None and ema.enabled:
                    ckpt.save_weights(staging / ckpt.EMA, ema.weights(), {"step": step})
                full_state = {"step": step, "rng": rng_state(), "skipped": self.skipped,
                              "world_size": self.runtime.world_size, "data_position": self._data_state(),
                              "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                              "ema_count": ema.count() if ema is not None else torch.tensor(0)}
                full_state.update(state or {})
                ckpt.save_state(staging / ckpt.STATE, full_state)
                ckpt.write_text(staging / ckpt.CONFIG, dumps_toml(to_dict(self.config)))
                full_meta = self.read_meta_or_empty()
                full_meta.update({"stage": self.stage, "format_version": ckpt.FORMAT_VERSION, "step": step,
                                  "ema": bool(ema is not None and ema.enabled)})
                full_meta.update(meta or {})
                ckpt.write_json(staging / ckpt.META, full_meta)
        except BaseException as e:
            self._save_failed(step, staging, e)
        self.runtime.barrier()
        if self.runtime.is_main:
            try:
                ckpt.commit(self.path, staging, step, self.config.train.keep_checkpoints)
            except BaseException as e:
                self._save_failed(step, staging, e)
            ckpt.write_json(self.path / ckpt.META, full_meta)
        self.runtime.barrier()

    def _save_failed(self, step: int, staging: Path, error: BaseException) -> None:
        """Remove the staging folder and re-raise; a write error (a full disk) becomes one line that says what to do."""
        if self.runtime.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        if not isinstance(error, OSError):
            raise error
        fix = "free space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that"
        raise ckpt.CheckpointError(
            f"could not write the checkpoint of step {step} in {self.path} ({error.strerror or error}); the previous "
            f"checkpoint is kept: {fix} and resume with --resume {self.path}") from error

    def read_meta_or_empty(self) -> dict:
        """The run's meta (newest checkpoint over the root copy), or {} before its first checkpoint."""
        exists = (self.path / ckpt.META).exists() or ckpt.has_checkpoint(self.path)
        return ckpt.read_meta(self.path) if exists else {}

    def _checkpoint_to_resume(self) -> ckpt.Checkpoint:
        """The newest complete checkpoint, chosen (and verified) by the main rank and shared with the others.

        Newer ones that fail verification are renamed to checkpoints/rejected-step-..., and one
        line says so; every rank then reads the same checkpoint.
        """
        chosen, error = None, None
        if self.runtime.is_main:
            rejected: list = []
            try:
                chosen = ckpt.latest(self.path, rejected)
                if chosen is None:
                    raise ckpt.CheckpointError(f"{self.path} has no checkpoint yet (it stopped before its first "
                                               f"save); start it again with --out {self.path}")
            except ckpt.CheckpointError as e:
                error = e
            if chosen is not None and rejected:
                moved = [ckpt.set_aside(self.path, folder).name for folder, _ in rejected]
                print(ckpt.fallback_message(self.path, chosen, rejected, f"; set aside as {', '.join(moved)}"),
                      file=sys.stderr)
        # (found, step, seq, legacy) from the main rank; the all-reduce is also the barrier.
        code = torch.zeros(4, dtype=torch.int64, device=self.runtime.device)
        if chosen is not None:
            seq = 0 if chosen.legacy else ckpt.folder_order(chosen.path)[1]
            code += torch.tensor([1, chosen.step, seq, int(chosen.legacy)], device=code.device)
        found, step, seq, legacy = self.runtime.all_reduce_sum(code).tolist()
        if error is not None:
            raise error
        if not found:
            raise ckpt.CheckpointError(f"{self.path}: the main rank found no checkpoint to resume from")
        if chosen is None:
            chosen = (ckpt.Checkpoint(self.path, step, legacy=True) if legacy
                      else ckpt.Checkpoint(ckpt.step_folder(self.path, step, seq), step))
        return chosen

    def restore(self, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                ema: EMA | None = None) -> tuple[int, dict]:
        """Load the newest complete checkpoint when resuming; returns (step, training state) or (0, {}).

        First removes what an interrupted save left behind (staging folders, temporary files).
        """
        from .runtime import unwrap

        if self.runtime.is_main:
            ckpt.remove_leftovers(self.path)
        if not self.resuming:
            self.runtime.barrier()
            return 0, {}
        chosen = self._checkpoint_to_resume()
        state = ckpt.load_state(chosen.file(ckpt.STATE))
        dev = self.runtime.device
        for name, module in modules.items():
            fname = ckpt.MODEL if name == "model" else f"{name}.safetensors"
            unwrap(module).load_state_dict(ckpt.load_weights(chosen.file(fname), dev))
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        if ema is not None and ema.enabled:
            ema.load(ckpt.load_weights(chosen.file(ckpt.EMA), dev), state["ema_count"])
        rng = state["rng"]
        if self.runtime.rank > 0:
            own = chosen.file(f"rng_rank{self.runtime.rank}.pt")
            if not own.exists():
                raise ckpt.CheckpointError(
                    f"{self.path} was saved by {state.get('world_size', 1)} process(es) and has no RNG state for "
                    f"rank {self.runtime.rank}; resume it with --nproc_per_node={state.get('world_size', 1)}")
            own_state = ckpt.load_state(own)
            rng, self._data_position = own_state["rng"], own_state.get("data_position")
        else:
            self._data_position = state.get("data_position")
        if self._data_position:  # kept as they are by a save before any batch is drawn (resumed at the last step)
            self._workers, self._positions = int(self._data_position["workers"]), _positions(self._data_position)
        set_rng_state(rng)
        self.skipped = int(state.get("skipped", 0))
        return int(state["step"]), state

    # ---- the loop -------------------------------------------------------------------------
    def lr_schedule(self, optimizer: torch.optim.Optimizer) -> LambdaLR:
        """torch's LambdaLR over `lr_factor`, positioned at the run's step; call `.step()` after each step.

        With --max-minutes the cosine decay follows the clock too, continuing from the progress
        an earlier invocation reached (recorded in the checkpoint). Time-based progress depends
        on the machine, so only budgeted runs use it: a run with no budget stays exactly
        reproducible and exactly resumable.
        """
        cfg = self.config.train
        for group in optimizer.param_groups:
            group["initial_lr"] = cfg.lr
        return LambdaLR(optimizer, lambda step: lr_factor(step, cfg, self._progress(step)),
                        last_epoch=self.start_step - 1)

    def _progress(self, step: int) -> float | None:
        cfg = self.config.train
        if step < cfg.warmup_steps or (cfg.max_minutes <= 0 and self._progress0 is None):
            return None
        p0 = self._progress0 or 0.0
        by_steps = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        by_time = p0
        if cfg.max_minutes > 0:
            by_time = p0 + (1 - p0) * (time.monotonic() - self._t0) / (cfg.max_minutes * 60)
        self._last_progress = min(1.0, max(by_steps, by_time))
        return self._last_progress

    def steps(self) -> Iterator[int]:
        """Step numbers from the start until train.steps, the time budget or a signal; then a checkpoint.

        SIGTERM or SIGINT lets the current step finish, saves, and raises `Stopped` ("stopped
        at step N; resume with --resume RUN"); every rank agrees through one collective.
        """
        cfg = self.config.train
        self._bar = progress(cfg.steps, f"train {self.stage}", initial=self.start_step, enabled=self.runtime.is_main)
        self._t0 = time.monotonic()
        step = self.start_step
        with StopSignals(self._note) as signals:
            self._signals = signals
            try:
                while step < cfg.steps:
                    out_of_time, signalled = self._should_stop(signals)
                    if signalled:
                        break
                    if out_of_time:
                        self._note(f"time budget of {cfg.max_minutes} min spent at step {step}; saving")
                        break
                    yield step
                    step += 1
                    self.done = step
                    self._bar.update(1)
            finally:
                self._bar.close()
            self.checkpoint(self.done)
            if self._should_stop(signals)[1]:
                raise Stopped(f"stopped at step {self.done}; resume with --resume {self.path}",
                              signals.received or 15)

    def _should_stop(self, signals: StopSignals) -> tuple[bool, bool]:
        budget = self.config.train.max_minutes
        over = budget > 0 and time.monotonic() - self._t0 > budget * 60
        # Every rank must stop at the same step, or DDP's collectives would hang.
        return self.runtime.any_rank(over, signals.received is not None)

    def batches(self, loader: Iterable[dict], start: int | None = None) -> Iterator[dict]:
        """The loader's batches from number `start` (default: the run's start step) on.

        A resumed run skips what it has already seen.

        A shard loader (data.reader.Loader) restarts each worker at the position the checkpoint
        recorded, reading but not decoding the rest of its epoch; any other loader, or a run
        saved without positions or with another number of workers, is replayed batch by batch.
        Either way the batches are the straight run's, bit for bit. Starting a torch DataLoader
        draws its workers' base seed from the global torch RNG; a resumed run starts it once more
        than a straight run, so the start and the skipping happen with the RNG forked: the
        training noise after a resume is the straight run's.
        """
        start = self.start_step if start is None else start
        workers = max(1, getattr(loader, "num_workers", 0))
        recorded = self._data_position
        fast = (start > 0 and hasattr(loader, "resumed") and recorded is not None
                and recorded["workers"] == workers and recorded["at"])
        # The replay below records the positions again; a restart starts from the recorded ones.
        self._positions = _positions(recorded) if fast else {}
        self._workers = workers
        with self.runtime.fork_rng():
            if fast:
                it = self._recorded(_in_turn(iter(loader.resumed(recorded["at"])), start % workers, workers))
            else:
                it = self._recorded(iter(loader))
                for _ in range(start):
                    next(it)
            first = next(it, None)
        if first is not None:
            yield first
            yield from it

    def _recorded(self, batches: Iterator[dict]) -> Iterator[dict]:
        """Pass batches through, noting each worker's stream position for the next checkpoint."""
        for batch in batches:
            if "position" in batch:
                worker, epoch, n = batch["position"]
                self._positions[int(worker)] = (int(epoch), int(n))
            yield batch

    def _data_state(self) -> dict:
        return {"workers": self._workers, "at": {w: list(p) for w, p in self._positions.items()}}

    def finite(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, part: str = "model") -> bool:
        """True when the loss and gradient norm are finite on every rank; else the step is skipped and counted.

        After train.max_nonfinite_steps in a row (for one `part`) the run stops with a
        NonFiniteError naming the step; the last checkpoint is left as it was.
        """
        bad = not (bool(torch.isfinite(loss.detach()).all()) and bool(torch.isfinite(grad_norm).all()))
        (bad,) = self.runtime.any_rank(bad)
        if not bad:
            self._in_a_row[part] = 0
            return True
        self.nonfinite_steps += 1
        row = self._in_a_row[part] = self._in_a_row.get(part, 0) + 1
        limit = self.config.train.max_nonfinite_steps
        self._note(f"step {step + 1}: the {part}'s loss or gradient norm is not finite; step skipped ({row} in a row)")
        if row >= limit:
            kept = f"step {self._saved_step}" if self._saved_step is not None else "none yet"
            raise NonFiniteError(f"step {step + 1}: the {part}'s loss or gradient norm was not finite {row} steps in "
                                 f"a row (train.max_nonfinite_steps = {limit}); stopped, last checkpoint kept "
                                 f"({kept}); lower train.lr or check the data")
        return False

    def checkpoint(self, step: int, meta: dict | None = None) -> None:
        """Save what `begin` named at `step` (the number of steps done); refuses weights that are not finite."""
        modules, optimizers, ema = self._tracked
        ema_weights = {"ema": ema.weights()} if ema is not None and ema.enabled else {}
        bad = nonfinite_weights(modules, ema_weights)
        if any(self.runtime.any_rank(bool(bad))):
            raise NonFiniteError(f"step {step}: the weights of {', '.join(bad) or 'another rank'} are not finite; "
                                 f"not saved, last checkpoint kept (step {self._saved_step}); lower train.lr")
        self.meta.update(meta or {})
        state = {"nonfinite_steps": self.nonfinite_steps}
        if self._last_progress is not None:
            state["lr_progress"] = self._last_progress
        self.save(step, modules, optimizers, ema, meta=self.meta, state=state)
        self._saved_step = step

    def sample(self, step: int, make_grid: Callable[[], Any]) -> None:
        """Run a periodic sample grid on the main rank; an error in it is reported and counted, not fatal."""
        if not self.runtime.is_main:
            return
        try:
            with self.runtime.fork_rng():
                make_grid()
        except Exception as e:  # a grid is a by-product: a broken one must not end hours of training
            self.sample_errors += 1
            self._note(f"step {step + 1}: the sample grid failed ({type(e).__name__}: {e}); training goes on")

    def _note(self, text: str) -> None:
        if not self.runtime.is_main:
            return
        if self._bar is not None and not getattr(self._bar, "disable", False):
            self._bar.write(text)
        else:
            print(text, flush=True)

    def count_images(self, n: int, skipped: int = 0) -> None:
        self._images += n
        self.skipped += skipped

    def every(self, interval: int, step: int) -> bool:
        """True after step `step` when `interval` steps have passed (counting steps from 1)."""
        return interval > 0 and (step + 1) % interval == 0

    def log(self, step: int, metrics: dict[str, float]) -> None:
        elapsed = max(1e-9, time.monotonic() - self._t0)
        metrics = {**metrics, "images_per_s": self._images * self.runtime.world_size / elapsed,
                   "skipped_samples": self.skipped, "nonfinite_steps": self.nonfinite_steps,
                   "sample_errors": self.sample_errors}
        self.logger.log(step + 1, metrics)
        if self._bar is not None:
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items()
                     if k in ("loss", "images_per_s", "psnr", "lr") or k.startswith("loss")}
            self._bar.set_postfix(shown, refresh=False)

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write summary.json (flat keys) and print it: how scripts and people read results."""
        summary = {**summary, "skipped_samples": self.skipped, "nonfinite_steps": self.nonfinite_steps,
                   "sample_errors": self.sample_errors}
        if self.runtime.is_main:
            ckpt.write_json(self.path / "summary.json", summary)
            self.logger.log(summary.get("steps", 0), {f"final/{k}": v for k, v in summary.items()
                                                      if isinstance(v, (int, float))})
            figures = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
            print(f"{self.stage} run {self.path}: {figures}")
        self.runtime.barrier()
        self.close()
        return summary

    def close(self) -> None:
        """Close the metric log and release the directory's lock (stage_main calls it however train ends)."""
        if self.logger is not None:
            self.logger.close()
        if self._signals is not None:
            self._signals.__exit__()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self in _OPEN:
            _OPEN.remove(self)


def _positions(recorded: dict) -> dict[int, tuple[int, int]]:
    """{worker: (epoch, samples read)} from a checkpoint's data_position {"workers", "at"}."""
    return {int(w): (int(e), int(n)) for w, (e, n) in recorded["at"].items()}


def _in_turn(batches: Iterator[dict], first: int, workers: int) -> Iterator[dict]:
    """A restarted DataLoader's batches in the interrupted one's order: worker `first`, then round robin.

    A DataLoader takes its workers' batches in turn from worker 0; the interrupted run had last
    taken one from worker first - 1. Each worker's own batches keep their order; at most
    `workers - 1` wait.
    """
    waiting: dict[int, deque] = {w: deque() for w in range(workers)}
    turn = first
    for batch in batches:
        waiting[int(batch["position"][0])].append(batch)
        while waiting[turn]:
            yield waiting[turn].popleft()
            turn = (turn + 1) % workers


def stage_main(build_parser, train, argv: list[str] | None = None):
    """A stage's command: parse its flags, train, and turn bad input into one line and exit code 2."""
    args = build_parser().parse_args(argv)
    with cli_errors():
        try:
            return train(args)
        finally:
            for run in list(_OPEN):
                run.close()
