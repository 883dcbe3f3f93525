"""What every training stage shares: the common flags, the run directory, resume, budget, checkpoints.

A stage's `main` stays one readable loop (lr, forward, loss, backward, clip, step, EMA, log,
sample, checkpoint); this module supplies the parts around it, written once:

    run = Run.start(args, StageConfig, PRESETS, stage="autoencoder")
    ...build model, optimizer, EMA...
    step = run.restore(modules, optimizers, ema)
    batches = run.batches(loader, step)
    for step in run.steps(step):
        ...
        if run.every(cfg.train.ckpt_every, step): run.save(step, modules, optimizers, ema)
    run.finish(step, summary, modules, optimizers, ema)
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

from . import checkpoint as ckpt
from .config import (Decay, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, dumps_toml, load_preset,
                     load_toml, to_dict)
from .ema import EMA
from .errors import cli_errors
from .errors import UserError
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
    keep_checkpoints: PositiveInt = 2  # newest complete checkpoints kept in RUN/checkpoints


def lr_at(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Linear warm-up, then constant or cosine decay to 10% of the peak.

    progress: the fraction of the run done after warm-up, 0..1 (default: by steps). A run with
    a time budget passes the larger of the step and time fractions, so the decay completes
    when the budget ends rather than at a step count it never reaches.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "cosine":
        if progress is None:
            progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, max(0.0, progress))
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    return cfg.lr  # "constant"


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and convolutions only (not norms, biases, embeddings' scales)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def add_train_args(parser: argparse.ArgumentParser, stage: str, default_preset: str = "tiny",
                   presets: Path | None = None) -> None:
    """The flags every `latentdiff train STAGE` takes; `presets` is the folder holding presets/*.toml."""
    where = parser.add_argument_group("run (one of --out and --resume is required)")
    target = where.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", metavar="RUN", help="run directory to create (new or empty)")
    target.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last checkpoint")
    where.add_argument("--data", help="dataset directory of shards (from `latentdiff data ...`) or a shard pattern; "
                                      "required for a new run, read from the run's records on --resume")
    names = sorted(p.stem for p in (Path(presets) / "presets").glob("*.toml")) if presets else []
    listed = f"{', '.join(names)}, " if names else ""
    parser.add_argument("--preset", default=default_preset,
                        help=f"{stage} preset: {listed or 'a name, '}or a .toml file (default: %(default)s)")
    parser.add_argument("--steps", type=int, help="total optimizer steps (train.steps)")
    parser.add_argument("--max-minutes", type=float, help="stop cleanly, evaluate and save after this many minutes")
    parser.add_argument("--batch-size", type=int, help="batch size per process (train.batch_size)")
    parser.add_argument("--lr", type=float, help="peak learning rate (train.lr)")
    parser.add_argument("--seed", type=int, help="random seed (train.seed)")
    parser.add_argument("--num-workers", type=int, help="data-loader workers per process")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set train.weight_decay=0.01 (repeatable; "
                             "an unknown key is an error that lists the known ones)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the GPU when there is one)")


def _cli_overrides(args: argparse.Namespace) -> list[str]:
    flags = {"steps": "train.steps", "max_minutes": "train.max_minutes", "batch_size": "train.batch_size",
             "lr": "train.lr", "seed": "train.seed", "num_workers": "train.num_workers"}
    out = [f"{key}={getattr(args, name)!r}" for name, key in flags.items() if getattr(args, name, None) is not None]
    return out + list(args.set)


class Run:
    """A stage's run directory and everything a loop needs around it."""

    def __init__(self, path: Path, stage: str, config: Any, runtime: Runtime, resuming: bool):
        self.path = path
        self.stage = stage
        self.config = config
        self.runtime = runtime
        self.resuming = resuming
        self.logger = MetricLogger(path, enabled=runtime.is_main)
        self.skipped = 0  # samples the data reader skipped (bad images, empty captions)
        self._t0 = time.monotonic()
        self._images = 0
        self._bar = None
        self._data_position: dict | None = None  # this rank's loader positions, from the checkpoint resumed
        self._positions: dict[int, tuple[int, int]] = {}  # worker -> (epoch, raw samples read) of batches used
        self._workers = 1

    # ---- set-up ---------------------------------------------------------------------------
    @classmethod
    def start(cls, args: argparse.Namespace, config_cls: type, preset_dir: Path, stage: str,
              derive: Callable[[Any], Any] | None = None) -> "Run":
        """Open (or reopen, with --resume) the run directory and write its resolved config.toml.

        derive: on a new run, a function config -> config that fills fields from the stages it
        reads (the decoder's network from its autoencoder), so config.toml alone rebuilds the model.
        """
        overrides = _cli_overrides(args)
        if args.resume:
            path = Path(args.resume)
            ckpt.read_meta(path, stage)
            config = load_toml(config_cls, ckpt.committed_file(path, ckpt.CONFIG), overrides)
            resuming = True
        else:
            if not args.out:
                raise UserError("--out RUN is required (or --resume RUN to continue a run)")
            path = Path(args.out)
            if (path / ckpt.META).exists() or ckpt.has_checkpoint(path):
                raise UserError(f"{path} already holds a run; pass --resume {path} to continue it, or another --out")
            config = load_preset(config_cls, preset_dir, args.preset, overrides)
            if derive is not None:
                config = derive(config)
            resuming = False
        runtime = Runtime.setup(config.train.seed, config.train.precision, getattr(args, "device", None))
        if runtime.is_main:
            path.mkdir(parents=True, exist_ok=True)
            ckpt.write_text(path / ckpt.CONFIG, dumps_toml(to_dict(config)))
        runtime.barrier()
        return cls(path, stage, config, runtime, resuming)

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
    def steps(self, start: int) -> Iterator[int]:
        """Yield step numbers from `start` until train.steps or the time budget is spent."""
        cfg = self.config.train
        self._bar = progress(cfg.steps, f"train {self.stage}", initial=start, enabled=self.runtime.is_main)
        self._t0 = time.monotonic()
        step = start
        try:
            while step < cfg.steps:
                if self._out_of_time():
                    if self.runtime.is_main:
                        self._bar.write(f"time budget of {cfg.max_minutes} min spent at step {step}; saving")
                    break
                yield step
                step += 1
                self._bar.update(1)
        finally:
            self._bar.close()

    def batches(self, loader: Iterable[dict], start: int) -> Iterator[dict]:
        """The loader's batches from number `start` on: a resumed run skips what it has already seen.

        A shard loader (data.reader.Loader) restarts each worker at the position the checkpoint
        recorded, reading but not decoding the rest of its epoch; any other loader, or a run
        saved without positions or with another number of workers, is replayed batch by batch.
        Either way the batches are the straight run's, bit for bit. Starting a torch DataLoader
        draws its workers' base seed from the global torch RNG; a resumed run starts it once more
        than a straight run, so the start and the skipping happen with the RNG forked: the
        training noise after a resume is the straight run's.
        """
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

    def lr(self, step: int) -> float:
        """The learning rate for `step`; with --max-minutes the cosine decay follows the clock too.

        Time-based progress depends on the machine, so only budgeted runs use it: a run with
        no budget stays exactly reproducible and exactly resumable.
        """
        cfg = self.config.train
        progress = None
        if cfg.max_minutes > 0 and step >= cfg.warmup_steps:
            by_steps = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            by_time = (time.monotonic() - self._t0) / (cfg.max_minutes * 60)
            progress = max(by_steps, by_time)
        return lr_at(step, cfg, progress)

    def _out_of_time(self) -> bool:
        budget = self.config.train.max_minutes
        if budget <= 0:
            return False
        over = torch.tensor(float(time.monotonic() - self._t0 > budget * 60))
        # Every rank must stop at the same step, or DDP's collectives would hang.
        return bool(self.runtime.all_reduce_sum(over).item() > 0)

    def count_images(self, n: int, skipped: int = 0) -> None:
        self._images += n
        self.skipped += skipped

    def every(self, interval: int, step: int) -> bool:
        """True after step `step` when `interval` steps have passed (counting steps from 1)."""
        return interval > 0 and (step + 1) % interval == 0

    def log(self, step: int, metrics: dict[str, float]) -> None:
        elapsed = max(1e-9, time.monotonic() - self._t0)
        metrics = {**metrics, "images_per_s": self._images * self.runtime.world_size / elapsed,
                   "skipped_samples": self.skipped}
        self.logger.log(step + 1, metrics)
        if self._bar is not None:
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items()
                     if k in ("loss", "images_per_s", "psnr", "lr") or k.startswith("loss")}
            self._bar.set_postfix(shown, refresh=False)

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write summary.json (flat keys) and print it: how scripts and people read results."""
        summary = {**summary, "skipped_samples": self.skipped}
        if self.runtime.is_main:
            ckpt.write_json(self.path / "summary.json", summary)
            self.logger.log(summary.get("steps", 0), {f"final/{k}": v for k, v in summary.items()
                                                      if isinstance(v, (int, float))})
            figures = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
            print(f"{self.stage} run {self.path}: {figures}")
        self.logger.close()
        self.runtime.barrier()
        return summary


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
        return train(args)
