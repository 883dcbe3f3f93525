"""A run directory: resolving its config, its lock, checking and loading a checkpoint, saving one.

`Run` (core/train.py) adds the loop's parts. A resume is checked before anything is written;
`save` and `restore` commit and verify a checkpoint as one unit (core/checkpoint.py).
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .config import dumps_toml, load_preset, load_toml, to_dict
from .ema import EMA
from .errors import UserError
from .faults import RunLock, RunLocked, StopSignals
from .flags import Reader, cli_overrides, config_changes, fill_from_run, require
from .logger import MetricLogger
from .runs import DataFingerprint, data_fingerprint, is_local, reading_for, recorded_data, restore_pins
from .runs import Reader as SourceReader
from .runtime import Runtime, rng_state, set_rng_state
from .sharding import (
    check_parallel,
    full_optimizer_state,
    full_state_dict,
    load_full_optimizer_state,
    load_full_state_dict,
)

_OPEN: list[RunDirectory] = []  # runs holding their directory's lock; stage_main releases them however train ends


def close_open_runs() -> None:
    """Release every run this process still holds (stage_main calls it however training ended)."""
    for run in list(_OPEN):
        run.close()


class RunDirectory:
    """A stage's run directory: its config, lock, checkpoints and what a resume restores."""

    def __init__(
        self,
        path: Path,
        stage: str,
        config: Any,
        runtime: Runtime,
        resuming: bool,
        recorded: dict | None = None,
        changes: list[str] | None = None,
        lock: RunLock | None = None,
    ):
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
        self.loss_jumps = 0  # divergences noticed (core.train.LossWatch; stages that watch their loss)
        self.start_step = 0
        self.done = 0  # steps done so far: the step the next checkpoint records
        self._in_a_row: dict[str, int] = {}
        self._saved_step: int | None = None
        self._saved_here = False  # a checkpoint committed by this process (see close)
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
        self.fingerprint: DataFingerprint | None = None  # of the data this invocation trains on
        self._new_data: dict | None = None  # what the run trained on before --new-data: {"data", "fingerprint", ...}
        self._recorded_train: Any = None  # on resume: the train config the run was saved with
        self._extend_lr: str | None = None  # --extend-lr as given (None: the default policy)
        self._created: tuple[bool, set[str]] | None = None  # new run: (folder existed, its entries before the start)
        self._reader: SourceReader | None = None  # pins the checkpoints of the runs it reads
        self._lr_state: dict = {}  # on resume: the checkpoint's "lr_segment" and "stopped_by" (core.train)

    # ---- set-up ---------------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        args: argparse.Namespace,
        config_cls: type,
        preset_dir: Path,
        stage: str,
        from_run: dict[str, Reader] | None = None,
        required: tuple[str, ...] = ("data",),
        derive: Callable[[Any], Any] | None = None,
        new_data_note: str = "",
    ) -> RunDirectory:
        """Resolve the config (fresh from a preset, or the run's own on --resume), lock the directory.

        On --resume the flags in `from_run` that the user left out are read back from the run,
        and nothing is written until `begin` has checked the checkpoint against the config.
        derive: on a new run, a function config -> config that fills fields from the stages it
        reads (the decoder's network from its autoencoder), so config.toml alone rebuilds the model.
        new_data_note: what else changes when the run is resumed on other data (--new-data), for the
        stage's messages (the autoencoder: its latent scale is re-measured), starting "; ".

        Refused with one line before anything is written: a batch larger than the dataset, a resume on
        other data (or data changed in place) without --new-data, a resume of a run another process holds.
        A new run that fails before its first checkpoint removes what it created (`close`).
        """
        overrides = cli_overrides(args)
        recorded, changes, old = None, [], None
        given_data = args.data
        if args.resume:
            path = Path(args.resume)
            # Before reading it (a run that has not saved yet has nothing to read); on the main rank alone, as
            # the others would find the lock the main rank takes below (torchrun sets RANK before Runtime.setup).
            main = os.environ.get("RANK", "0") == "0"
            holder = ckpt.lock_holder(path) if main and path.is_dir() else None
            if holder is not None:
                raise RunLocked(f"{path} is in use by {holder}; wait for it to end before resuming it")
            recorded = ckpt.read_meta(path, stage)
            readers = {"data": lambda meta, run: recorded_data(run, stage), **(from_run or {})}
            fill_from_run(args, recorded, path, readers)
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
        check_parallel(stage, config.train.parallel)
        if derive is not None and not args.resume:
            config = derive(config)
        runtime = Runtime.setup(
            config.train.seed, config.train.precision, getattr(args, "device", None), config.train.deterministic
        )
        runtime.announce(getattr(args, "device", None))
        fingerprint = data_fingerprint(args.data) if args.data else None
        _check_batch_size(args, config.train.batch_size, runtime.world_size, fingerprint)
        new_data = None
        if recorded is not None:
            new_data = _check_same_data(path, recorded, args, given_data, fingerprint, new_data_note)
        existed = path.exists()
        before = set(os.listdir(path)) if existed and not args.resume else set()
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
        run.fingerprint, run._new_data = fingerprint, new_data
        run._recorded_train = old.train if old is not None else None
        run._extend_lr = getattr(args, "extend_lr", None)
        if not run.resuming:
            run._created = (existed, before)
        # Every run this one reads from now on (load_run) is pinned for it, so their pruning keeps it.
        run._reader = SourceReader(path, stage, pin=runtime.is_main)
        reading_for(run._reader)
        if not run.resuming:
            run._write_config()
        elif runtime.is_main:
            run._say_new_data(new_data_note)
            run._say_dependents()
        runtime.barrier()
        return run

    def _say_new_data(self, note: str) -> None:
        if self._new_data is not None:
            was = self._new_data["data"]
            was = was.get("path") if isinstance(was, dict) else was
            self._note(
                f"resume on new data: {self.path} trains on from step {self._new_data['until_step']} on "
                f"{self._new_data['now']} as it is now (was {was}); the data order starts over{note}"
            )

    def _say_dependents(self) -> None:
        """One line naming the runs that read this one's checkpoints: those checkpoints stay, whatever it does."""
        pinned = ckpt.pins(self.path)
        if pinned:
            readers = "; ".join(f"{p.stage} {p.dependent} reads {p.checkpoint}" for p in pinned)
            self._note(
                f"{self.path} is read by {len(pinned)} run(s) ({readers}): those checkpoints are kept (pinned), "
                "and those runs go on reading them whatever this run trains"
            )

    def _write_config(self) -> None:
        if self.runtime.is_main:
            ckpt.write_text(self.path / ckpt.CONFIG, dumps_toml(to_dict(self.config)))

    def begin(
        self,
        modules: dict[str, torch.nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        ema: EMA | None = None,
        meta: dict | None = None,
    ) -> int:
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
        self.meta["data_fingerprint"] = self.fingerprint.to_dict() if self.fingerprint is not None else None
        self.meta["runtime"] = self.runtime.record()  # this invocation's device, precision, versions, determinism
        if self._new_data is not None:
            changes = list((self.recorded or {}).get("data_changes") or [])
            self.meta["data_changes"] = [*changes, {k: v for k, v in self._new_data.items() if k != "now"}]
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
        hyper = {
            name: [{k: v for k, v in g.items() if k not in ("params", "initial_lr")} for g in opt.param_groups]
            for name, opt in optimizers.items()
        }
        present = {
            name: m
            for name, m in modules.items()
            if name == "model" or ckpt.committed_file(self.path, f"{name}.safetensors").exists()
        }
        fresh = [name for name in modules if name not in present]
        with_ema = ema is not None and ema.enabled and bool(self.recorded.get("ema"))
        try:
            step, state = self.restore(
                present, {k: o for k, o in optimizers.items() if k in present}, ema if with_ema else None
            )
        except ckpt.CheckpointError:
            raise
        except (RuntimeError, ValueError, KeyError) as e:
            if not isinstance(e, KeyError) and "state dict" not in str(e).lower().replace("_", " "):
                raise  # not load_state_dict refusing the weights or groups (say, out of memory)
            changed = "; ".join(self._changes) or "no config change"
            first = str(e).strip().splitlines()[-1].strip().rstrip(".")[:200]
            raise ckpt.CheckpointError(
                f"cannot resume {self.path}: its checkpoint does not fit the config "
                f"({changed}): {first}. Start a new run with --out instead"
            ) from None
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.runtime.world_size:
            raise ckpt.CheckpointError(
                f"{self.path} was trained by {saved_world} process(es) and this resume has "
                f"{self.runtime.world_size}: each process's data shard and random stream are part of the run; "
                f"resume it with {saved_world} (torchrun --nproc_per_node={saved_world})"
            )
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
        self.loss_jumps = int(state.get("loss_jumps", 0))
        if self._new_data is not None:  # positions in the old data's shards mean nothing in the new ones
            self._data_position, self._positions = None, {}
        self._lr_state = {k: state.get(k) for k in ("lr_segment", "stopped_by")}
        progress0 = state.get("lr_progress")
        self._progress0 = float(progress0) if progress0 is not None else None
        return step

    # ---- checkpoints ----------------------------------------------------------------------
    def save(
        self,
        step: int,
        modules: dict[str, torch.nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        ema: EMA | None = None,
        meta: dict | None = None,
        state: dict | None = None,
    ) -> None:
        """Write one checkpoint (weights, EMA, training state, meta, config) and commit it as a unit.

        Every rank writes into the same staging folder, the others their own RNG state (each rank
        draws its own noise, so a resume restores every rank's stream); after a barrier the main
        rank commits it (core.checkpoint.commit) and refreshes the root meta.json people read.
        Sharded modules (train.parallel "fsdp") are first gathered by every rank together into the
        main rank's memory (core.sharding), so the files are the ones one process writes.
        A failed write (a full disk) removes the staging folder and raises CheckpointError; the
        previous checkpoint stays the newest.
        """
        staging = ckpt.staging_dir(self.path, step)
        full_meta = {}
        # Collectives when sharded, so on every rank; the main rank's full tensors (the others' are empty).
        weights = {name: full_state_dict(module) for name, module in modules.items()}
        ema_weights = full_state_dict(ema.module) if ema is not None and ema.enabled else {}
        optimizer_states = {k: full_optimizer_state(modules[k], o) for k, o in optimizers.items()}
        try:
            if not self.runtime.is_main:
                ckpt.save_state(
                    staging / f"rng_rank{self.runtime.rank}.pt",
                    {"step": step, "rng": rng_state(self.runtime.device), "data_position": self._data_state()},
                )
            else:
                for name in modules:
                    fname = ckpt.MODEL if name == "model" else f"{name}.safetensors"
                    ckpt.save_weights(staging / fname, weights[name], {"step": step})
                if ema is not None and ema.enabled:
                    ckpt.save_weights(staging / ckpt.EMA, ema_weights, {"step": step})
                full_state = {
                    "step": step,
                    "rng": rng_state(self.runtime.device),
                    "skipped": self.skipped,
                    "world_size": self.runtime.world_size,
                    "data_position": self._data_state(),
                    "optimizers": optimizer_states,
                    "ema_count": ema.count() if ema is not None else torch.tensor(0),
                }
                full_state.update(state or {})
                ckpt.save_state(staging / ckpt.STATE, full_state)
                ckpt.write_text(staging / ckpt.CONFIG, dumps_toml(to_dict(self.config)))
                full_meta = self.read_meta_or_empty()
                full_meta.update(
                    {
                        "stage": self.stage,
                        "format_version": ckpt.FORMAT_VERSION,
                        "step": step,
                        "ema": bool(ema is not None and ema.enabled),
                    }
                )
                full_meta.update(meta or {})
                ckpt.write_json(staging / ckpt.META, full_meta)
        except BaseException as e:
            self._save_failed(step, staging, e)
        self.runtime.barrier()
        if self.runtime.is_main:
            try:
                ckpt.commit(self.path, staging, step, self.config.train.keep_checkpoints)
                self._saved_here = True
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
            f"checkpoint is kept: {fix} and resume with --resume {self.path}"
        ) from error

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
                    raise ckpt.CheckpointError(
                        f"{self.path} has no checkpoint yet (it stopped before its first "
                        f"save); start it again with --out {self.path}"
                    )
            except ckpt.CheckpointError as e:
                error = e
            if chosen is not None and rejected:
                moved = [ckpt.set_aside(self.path, folder).name for folder, _ in rejected]
                print(
                    ckpt.fallback_message(self.path, chosen, rejected, f"; set aside as {', '.join(moved)}"),
                    file=sys.stderr,
                )
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
            chosen = (
                ckpt.Checkpoint(self.path, step, legacy=True)
                if legacy
                else ckpt.Checkpoint(ckpt.step_folder(self.path, step, seq), step)
            )
        return chosen

    def restore(
        self, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer], ema: EMA | None = None
    ) -> tuple[int, dict]:
        """Load the newest complete checkpoint when resuming; returns (step, training state) or (0, {}).

        First removes what an interrupted save left behind (staging folders, temporary files).
        Sharded modules take their slices of the full tensors every rank reads (core.sharding).
        """
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
            load_full_state_dict(module, ckpt.load_weights(chosen.file(fname), dev))
        for name, opt in optimizers.items():
            load_full_optimizer_state(modules[name], opt, state["optimizers"][name])
        if ema is not None and ema.enabled:
            ema.load(ckpt.load_weights(chosen.file(ckpt.EMA), dev), state["ema_count"])
        rng = state["rng"]
        if self.runtime.rank > 0:
            own = chosen.file(f"rng_rank{self.runtime.rank}.pt")
            if not own.exists():
                raise ckpt.CheckpointError(
                    f"{self.path} was saved by {state.get('world_size', 1)} process(es) and has no RNG state for "
                    f"rank {self.runtime.rank}; resume it with --nproc_per_node={state.get('world_size', 1)}"
                )
            own_state = ckpt.load_state(own)
            rng, self._data_position = own_state["rng"], own_state.get("data_position")
        else:
            self._data_position = state.get("data_position")
        if self._data_position:  # kept as they are by a save before any batch is drawn (resumed at the last step)
            self._workers, self._positions = int(self._data_position["workers"]), worker_positions(self._data_position)
        note = set_rng_state(rng, self.runtime.device)
        if note:  # each rank restores its own generators, so each says what it could not
            who = f" (rank {self.runtime.rank})" if self.runtime.distributed else ""
            print(f"resume{who}: {note}", file=sys.stderr)
        self.skipped = int(state.get("skipped", 0))
        return int(state["step"]), state

    def _data_state(self) -> dict:
        return {"workers": self._workers, "at": {w: list(p) for w, p in self._positions.items()}}

    def _note(self, text: str) -> None:
        if not self.runtime.is_main:
            return
        if self._bar is not None and not getattr(self._bar, "disable", False):
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        """Close the metric log and release the directory's lock (stage_main calls it however train ends).

        A new run that ends before its first checkpoint (a failed start) has trained nothing: it
        removes what it created (the folder, or the entries it added to an existing one). Any run that
        saved nothing in this process puts back the pins it moved in the runs it read (a new run: none),
        so `--out` starts afresh and the sources prune as before.
        """
        if self.logger is not None:
            self.logger.close()
        if self._signals is not None:
            self._signals.__exit__()
        failed_start = (
            self._created is not None
            and self._saved_step is None
            and self.runtime.is_main
            and not ckpt.has_checkpoint(self.path)
        )
        if self._reader is not None:
            if not self._saved_here and self.runtime.is_main:
                # Nothing saved here (a failed start, a refused resume): its checkpoints read what they read.
                restore_pins(self._reader)
            reading_for(None)
            self._reader = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if failed_start:
            self._remove_created()
        if self in _OPEN:
            _OPEN.remove(self)

    def _remove_created(self) -> None:
        existed, before = self._created
        self._created = None
        for entry in self.path.iterdir():
            if entry.name in before:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        if not existed:
            try:
                self.path.rmdir()
            except OSError:
                pass  # something else was written there meanwhile: leave it


def _check_batch_size(args: argparse.Namespace, batch: int, world: int, data: DataFingerprint | None) -> None:
    """Refuse (one line) a batch larger than the training split its info.json counts: it could only repeat images."""
    if data is None or data.train is None or batch * world <= data.train:
        return
    given = f"--batch-size {batch}" if getattr(args, "batch_size", None) is not None else f"train.batch_size {batch}"
    per = f" per process x {world} processes" if world > 1 else ""
    raise UserError(
        f"{given}{per} is more than the {data.train} training images of {args.data} (its info.json): "
        f"pass --batch-size {max(1, data.train // world)} or less"
    )


def _check_same_data(
    path: Path,
    recorded: dict,
    args: argparse.Namespace,
    given: str | None,
    now: DataFingerprint | None,
    note: str,
) -> dict | None:
    """On resume: None when the data is the run's own; else what the run trained on before, for the record.

    Other data is another fingerprint (core.runs.data_fingerprint: the dataset was replaced or rebuilt
    in place), or, for runs without one and streamed data, another --data than the recorded one. The
    same files moved elsewhere are the same data. Without --new-data it is refused (UserError, one line).
    """
    record = recorded.get("data")
    old_path = record.get("path") if isinstance(record, dict) else record
    old = recorded.get("data_fingerprint")
    data = str(args.data)
    if old is not None and now is not None:
        if old.get("sha256") == now.sha256:
            return None
        was = f"{old.get('shards')} shards, {old.get('bytes', 0):,} bytes"
        same_place = old_path is not None and is_local(data) and Path(old_path) == Path(data).expanduser().resolve()
        if not same_place:
            change = f"--data {data} is other data than {old_path} ({was} -> {now.describe()})"
        elif (old.get("shards"), old.get("bytes")) == (now.shards, now.bytes):
            change = f"{data} changed since it was trained on (rewritten: the same {was}, newer files or info.json)"
        else:
            change = f"{data} changed since it was trained on ({was} then, {now.describe()} now)"
    elif given is None or old_path is None:
        return None  # no fingerprint recorded (an older run) nor another --data: nothing says it changed
    elif (Path(old_path) == Path(given).expanduser().resolve()) if is_local(given) else old_path == given:
        return None
    else:
        change = f"--data {given} is not the data it recorded ({old_path})"
    step = int(recorded.get("step", 0))
    if not getattr(args, "new_data", False):
        raise UserError(
            f"{path} was trained to step {step} on other data: {change}; pass --new-data to train on it from "
            f"step {step}, its data order starting over{note}"
        )
    return {"data": record, "fingerprint": old, "until_step": step, "now": data}


def worker_positions(recorded: dict) -> dict[int, tuple[int, int]]:
    """{worker: (epoch, samples read)} from a checkpoint's data_position {"workers", "at"}."""
    return {int(w): (int(e), int(n)) for w, (e, n) in recorded["at"].items()}
