"""What every training stage shares: the run directory, resume, LR schedule, budget, faults, checkpoints.

A stage's `train` is one loop that reads straight down (nanoGPT's and DiT's train.py are the
model); this module supplies the parts around it, written once:

    run = Run.start(args, StageConfig, PRESETS, stage="prior", from_run=FROM_RUN)
    ...build model, optimizer, EMA...
    scheduler = run.begin({"model": model}, {"model": opt}, ema, meta=meta)  # restores when resuming
    net = run.wrap(model)  # channels_last, DDP/FSDP, torch.compile as the config asks
    batches = run.batches(loader)
    for step in run.steps():  # stops at train.steps, the time budget or a signal; saves at the end
        batch = next(batches)
        lr = scheduler.get_last_lr()[0]
        loss = ...forward through net, and the loss...
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip or math.inf)
        if run.finite(step, loss, grad_norm):  # the step's one read: a non-finite step is skipped and counted
            opt.step()
        run.advance(images=B, skipped=batch["skipped"])  # the lr schedule moves on; images counted
        ema.update(model)
        if run.every(tcfg.log_every, step): run.log(step, {...})
        if run.every(tcfg.sample_every, step): run.sample(step, lambda: ...)
        if run.every(tcfg.ckpt_every, step): run.checkpoint(step + 1)
    summary = {...evaluation of ema.final(model)...}
    return run.finish(summary)  # adds "steps"; writes summary.json; releases the run directory's lock

The run directory (config, lock, checkpoints, resume) is core/run_directory.py; the flags
(`add_train_args`) live in core/flags.py; what happens on each fault in core/faults.py.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

from . import checkpoint as ckpt
from . import run_directory
from .config import Decay, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from .ema import EMA
from .errors import Stopped, UserError, cli_errors
from .faults import NonFiniteError, OutOfMemory, StopSignals, nonfinite_weights, out_of_memory_message
from .logger import progress
from .run_directory import RunDirectory, close_open_runs, worker_positions
from .runtime import Precision
from .sharding import Parallel


@dataclass(frozen=True)
class TrainConfig:
    steps: PositiveInt = 1000  # optimizer steps; the run ends at `steps` or `max_minutes`, whichever comes first
    max_minutes: NonNegativeFloat = 0.0  # wall-clock budget for this invocation (0: none); stops cleanly and saves
    # Stop this invocation after this many minutes as a signal would (0: never): the lr schedule keeps max_minutes'
    # horizon, so a resume continues it where it was (a curriculum: the first part of a budget on other data).
    # Counted as max_minutes is; one at or past max_minutes never comes.
    pause_minutes: NonNegativeFloat = 0.0
    batch_size: PositiveInt = 64  # per rank
    lr: PositiveFloat = 1e-3  # peak learning rate (AdamW)
    warmup_steps: NonNegativeInt = 0  # linear warm-up from 0 to lr
    lr_decay: Literal["constant", "cosine"] = "constant"  # cosine: to 10% of lr at `steps`
    weight_decay: NonNegativeFloat = 0.0  # AdamW decoupled weight decay, not applied to norms and biases
    betas: tuple[Decay, Decay] = (0.9, 0.999)  # AdamW betas
    # "adamw8bit": bitsandbytes' AdamW8bit (Dettmers et al. 2022), its two moments in 8 bits: 2 bytes per parameter
    # instead of 8 (docs/finetuning.md); refused in one line when bitsandbytes is not installed
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    grad_clip: NonNegativeFloat = 1.0  # max global gradient norm (0: no clipping)
    ema_decay: Decay = 0.0  # EMA of the weights (0: none)
    ema_warmup: bool = True  # ramp the EMA decay up as min(ema_decay, (1+n)/(10+n)) over the first n updates
    seed: int = 0  # one seed for weights, data order and noise
    num_workers: NonNegativeInt = 0  # data-loader worker processes per rank
    precision: Precision = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32" or "bf16"
    # Under torchrun: "ddp" keeps a whole replica (weights, gradients, AdamW state) on every process;
    # "fsdp" shards them over the processes (core/sharding.py), for a prior or autoencoder that
    # outgrows one GPU. Checkpoints are the same either way (docs/devices.md, Models that outgrow one GPU).
    parallel: Parallel = "ddp"
    # The network's weights and 4-d inputs in torch.channels_last (NHWC), the layout GPU tensor cores
    # read (Run.wrap). Off by default (its CPU timing: docs/benchmarks.md,
    # The training step); on a GPU, `python -m bench.gpu` measures it.
    channels_last: bool = False
    # torch.compile the network's training forward (Run.wrap). Off by default: compiling costs start-up time
    # (its CPU timing: docs/benchmarks.md), and the prior compiles again once caption lengths vary.
    compile: bool = False
    log_every: NonNegativeInt = 25  # steps between metric lines (0: none)
    sample_every: NonNegativeInt = 500  # steps between sample/reconstruction grids (0: only at the end)
    ckpt_every: NonNegativeInt = 500  # steps between checkpoints (0: none; always one at the end)
    max_nonfinite_steps: PositiveInt = 10  # non-finite losses or gradient norms in a row before the run stops
    keep_checkpoints: PositiveInt = 2  # newest complete checkpoints kept in RUN/checkpoints
    # A stage whose loss has a floor (the prior's denoising loss) warns when the median of its last 4 logged
    # losses rises above this many times the lowest such median: a divergence, which a run left alone for
    # days would otherwise hide (LossWatch). 0: off. Other stages ignore it.
    loss_jump: NonNegativeFloat = 3.0
    # Deterministic kernels (core.runtime.use_deterministic_kernels; --deterministic): the same numbers on the
    # same GPU and software, so a GPU run resumes bit for bit. Off: CPU kernels are deterministic without it,
    # and on GPUs it costs speed (docs/devices.md).
    deterministic: bool = False


@dataclass(frozen=True)
class LossJump:
    """A loss that rose and stayed up (LossWatch.see): at `step`, the median `loss` against its lowest, `best`."""

    step: int  # steps done when it was noticed
    loss: float  # the median of the last logged losses there
    best: float  # the lowest such median before
    best_step: int  # where that lowest median was seen

    @property
    def ratio(self) -> float:
        return self.loss / self.best

    def message(self, window: int) -> str:
        return (
            f"step {self.step}: the loss jumped to {self.loss:.3g} (median of the last {window} logs), "
            f"{self.ratio:.1f} times its lowest ({self.best:.3g} at step {self.best_step}): training has likely "
            'diverged and goes on; lower train.lr or set train.lr_decay = "cosine" (docs/reliability.md)'
        )


class LossWatch:
    """Notices a loss that jumps and stays up: a divergence, which no non-finite check sees.

    Each logged loss is kept; once `window` are in, their median is compared with the lowest median seen
    so far, and a median above `factor` times it is a jump (one LossJump, then none until the median is
    back under the threshold). For losses with a floor, as the denoising loss has (the irreducible error
    of predicting eps or v): they fall, then wander within a fraction of their level, so a sustained rise
    by a factor is not noise; the median ignores one bad batch. Seen in a prior at lr 3e-3 that collapsed
    after 2,250 steps, its loss 0.025 -> 0.2 for good (docs/scenes.md). A loss that falls towards 0 (a
    classifier's) would rise by factors through noise alone: those stages do not watch.
    """

    def __init__(self, factor: float, window: int = 4):
        if factor <= 1:
            raise ValueError(f"a loss jump is a factor above 1, got {factor!r}")
        self.factor, self.window = factor, window
        self._recent: deque[float] = deque(maxlen=window)
        self._best, self._best_step, self._up = math.inf, 0, False

    def see(self, step: int, loss: float) -> LossJump | None:
        """Take the loss logged after `step` steps; a LossJump when this is where the median first exceeds the bound."""
        if not math.isfinite(loss):
            return None  # non-finite steps are Run.finite's
        self._recent.append(loss)
        if len(self._recent) < self.window:
            return None
        median = statistics.median(self._recent)
        if median < self._best:
            self._best, self._best_step = median, step
        if median <= self.factor * self._best:
            self._up = False
            return None
        if self._up:
            return None
        self._up = True
        return LossJump(step, median, self._best, self._best_step)


FLOOR = 0.1  # where a cosine decay ends, as a fraction of the peak lr
ExtendLr = Literal["continue", "rewarm", "hold"]  # --extend-lr (core.flags.EXTEND_LR)


@dataclass(frozen=True)
class LrSegment:
    """The lr schedule of an extended run from step `start` on, by the policy --extend-lr chose.

    A run resumed past its end (more --steps, another --max-minutes after its budget was spent),
    or with its horizon changed (train.steps, max_minutes, lr_decay), starts a segment; every
    checkpoint after records it, so a resume inside the extension continues it exactly.
    continue: a new cosine from `factor` down to the floor over the extension (constant decay: `factor`);
    rewarm: the schedule again over the extension, warm-up (train.warmup_steps) and all, from the peak
    (a warm restart, SGDR: Loshchilov & Hutter 2017); hold: `factor` to the end.
    """

    start: int  # the step the extension starts at
    factor: float  # the lr there under the schedule before it, as a fraction of train.lr
    policy: ExtendLr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LrSegment:
        return cls(int(data["start"]), float(data["factor"]), data["policy"])


def lr_factor(step: int, cfg: TrainConfig, progress: float | None = None, segment: LrSegment | None = None) -> float:
    """The learning rate at `step` as a fraction of the peak: linear warm-up, then constant or cosine to 10%.

    progress: the fraction of the run done after warm-up, 0..1 (default: by steps). A run with
    a time budget passes the larger of the step and time fractions, so the decay completes
    when the budget ends rather than at a step count it never reaches.
    segment: after an extension, the schedule from segment.start on (LrSegment); progress is
    then the fraction of the extension done.
    """
    if segment is not None and step >= segment.start:
        if segment.policy == "rewarm":
            return lr_factor(
                step - segment.start, dataclasses.replace(cfg, steps=max(1, cfg.steps - segment.start)), progress
            )
        if segment.policy == "hold" or cfg.lr_decay != "cosine":
            return segment.factor
        if progress is None:
            progress = (step - segment.start) / max(1, cfg.steps - segment.start)
        low = min(FLOOR, segment.factor)
        return low + (segment.factor - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "cosine":
        if progress is None:
            progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, max(0.0, progress))
        return FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0  # "constant"


def make_optimizer(params, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices and convolutions only (not norms, biases, embeddings' scales).

    lr: the peak learning rate of these parameters (default train.lr; a LoRA run's adapters take lora.lr); the
    groups carry it as "peak_lr", which the lr schedule scales (Run.lr_schedule).
    train.optimizer "adamw8bit": bitsandbytes' AdamW8bit over the same groups (UserError when not installed).
    """
    lr = cfg.lr if lr is None else lr
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "peak_lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "peak_lr": lr},
    ]
    if cfg.optimizer == "adamw8bit":
        return adamw8bit(groups, lr=lr, betas=cfg.betas)
    return adamw(groups, lr=lr, betas=cfg.betas)


def adamw8bit(groups: list[dict], **options) -> torch.optim.Optimizer:
    """bitsandbytes.optim.AdamW8bit (block-wise 8-bit moments, Dettmers et al. 2022) over `groups`."""
    try:
        import bitsandbytes
    except ImportError:
        raise UserError(
            'train.optimizer = "adamw8bit" needs bitsandbytes, which is not installed: pip install bitsandbytes '
            '(or train.optimizer = "adamw")'
        ) from None
    return bitsandbytes.optim.AdamW8bit(groups, **options)


FUSED_DEVICES = ("cuda",)  # where every optimizer takes AdamW's fused kernel (adamw)


def adamw_kernel(devices: set[str]) -> dict[str, bool]:
    """How AdamW runs over parameters on these device types: {"fused": True} or {"foreach": True}.

    Fused (one kernel for all parameters) when they are all on CUDA. Elsewhere foreach (one op
    per kind over the list), which on the CPU gives the same bits as torch's default per-tensor
    loop, faster (docs/benchmarks.md, The training step); the CPU's fused kernel rounds differently, so CPU
    runs keep the numbers they had.
    """
    if devices and all(d in FUSED_DEVICES for d in devices):
        return {"fused": True}
    return {"foreach": True}


def adamw(params, **options) -> torch.optim.AdamW:
    """torch.optim.AdamW over `params` (tensors or param groups) with the kernel adamw_kernel picks for them.

    Every optimizer of the project is built here (the model's through make_optimizer, the PatchGAN's).
    """
    groups = list(params)
    tensors = [t for g in groups for t in (g["params"] if isinstance(g, dict) else [g])]
    return torch.optim.AdamW(groups, **options, **adamw_kernel({t.device.type for t in tensors}))


def steps_within_budget(
    start: int, step: int, elapsed_s: float, max_minutes: float, max_steps: int, spent_s: float = 0.0
) -> int:
    """The step a budgeted run is expected to end at: its pace so far carried to the end of the budget.

    start: the step this invocation started from; step: the steps done so far (absolute);
    elapsed_s: seconds since the loop started; spent_s: seconds of the budget spent before it (Run.spend).
    Never beyond max_steps (train.steps), never before step.
    """
    pace = (step - start) / max(elapsed_s, 1e-9)  # steps per second in this invocation
    projected = start + round(pace * max(0.0, max_minutes * 60 - spent_s))
    return int(min(max_steps, max(step, projected)))


class Run(RunDirectory):
    """A stage's run directory (core/run_directory.py) and everything its loop needs around it."""

    _schedule: LambdaLR | None = None  # the lr schedule `advance` moves on after each step
    _segment: LrSegment | None = None  # the extension the lr follows (LrSegment), if any
    _stopped_by: str | None = None  # why the loop ended: "steps", "budget", "pause" or "signal" (recorded in the state)
    _voted: tuple[bool, bool] | None = None  # (out of time, signalled) as the ranks agreed in this step's vote
    _loss_watch: LossWatch | None = None  # set by watch_loss: the logged "loss" is checked for jumps
    _spent_s: float = 0.0  # seconds of this invocation's time budget spent before the loop (`spend`)

    def begin(self, modules: dict, optimizers: dict, ema: EMA | None = None, meta: dict | None = None) -> LambdaLR:
        """RunDirectory.begin (name what is checkpointed; check and restore when resuming), then the lr schedule.

        Returns `lr_schedule(optimizers["model"])`: positioned at the step the run starts from,
        moved on by `advance` after each step.
        """
        super().begin(modules, optimizers, ema, meta)
        return self.lr_schedule(optimizers["model"])

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The network as the loop runs it: channels_last, DDP or FSDP under torchrun (Runtime.wrap), compiled.

        train.channels_last: `model`'s weights (and the EMA's) move to torch.channels_last in place,
        and its 4-d inputs are converted as they enter (a forward pre-hook), so a conv network reads
        NHWC throughout. train.compile: torch.compile over the wrapped network. `model` itself stays
        the bare module: checkpoints, the EMA and previews use it and its parameter names, and
        `runtime.unwrap` finds it under every wrapper. Call after `begin` (which restores weights).
        """
        cfg = self.config.train
        if cfg.channels_last:
            _, _, ema = self._tracked
            for module in (model, ema.module if ema is not None and ema.enabled else None):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
            model.register_forward_pre_hook(_channels_last_inputs)
        net = self.runtime.wrap(model)
        return torch.compile(net) if cfg.compile else net

    # ---- the loop -------------------------------------------------------------------------
    def lr_schedule(self, optimizer: torch.optim.Optimizer) -> LambdaLR:
        """torch's LambdaLR over `lr_factor`, positioned at the run's step; `advance` moves it on after each step.

        With --max-minutes the cosine decay follows the clock too, continuing from the progress
        an earlier invocation reached (recorded in the checkpoint). Time-based progress depends
        on the machine, so only budgeted runs use it: a run with no budget stays exactly
        reproducible and exactly resumable. A resume that extends the run follows --extend-lr
        (`_extension`): the lr it starts at is printed and recorded in meta.json ("lr_extensions").
        `begin` calls it for the model's optimizer.
        """
        cfg = self.config.train
        for group in optimizer.param_groups:
            group["initial_lr"] = group.get("peak_lr", cfg.lr)  # make_optimizer's lr for the group
        extended = self._extension()
        self._t0 = time.monotonic()  # the budget's clock, so the first lr is the one at the start
        self._schedule = LambdaLR(
            optimizer,
            lambda step: lr_factor(step, cfg, self._progress(step), self._segment),
            last_epoch=self.start_step - 1,
        )
        if extended:
            self._say_extension(self._schedule.get_last_lr()[0])
        return self._schedule

    def _extension(self) -> bool:
        """Set `_segment` for this invocation: the recorded one, or a new one when this resume extends the run.

        An extension: the run had ended (its steps done, or its budget spent) and is resumed with steps
        left, or its horizon changed (train.steps, max_minutes, lr_decay). A run stopped early (a signal,
        SIGKILL) resumed as it was continues its schedule exactly. Inside the warm-up nothing is
        extended: the cosine has not started, and the new horizon only sets its length.
        """
        cfg, old, state = self.config.train, self._recorded_train, self._lr_state
        recorded = LrSegment.from_dict(state["lr_segment"]) if state.get("lr_segment") else None
        self._segment = recorded
        if not self.resuming or old is None:
            return False
        start = self.start_step
        ended = state.get("stopped_by") in ("steps", "budget") or start >= old.steps
        horizon = [(o, n) for o, n in ((old.steps, cfg.steps), (old.max_minutes, cfg.max_minutes)) if o != n]
        changed = bool(horizon) or old.lr_decay != cfg.lr_decay
        if start >= cfg.steps or start < cfg.warmup_steps or not (ended or changed):
            if self._extend_lr is not None:
                self._note(f"--extend-lr {self._extend_lr} has no effect: this resume does not extend {self.path}")
            return False
        progress = self._progress0 if (old.max_minutes > 0 or self._progress0 is not None) else None
        factor = lr_factor(start, old, progress, recorded)
        self._segment = LrSegment(start, factor, self._extend_lr or "continue")
        self._progress0 = 0.0 if cfg.max_minutes > 0 else None  # the extension's own budget starts now
        return True

    def _say_extension(self, lr: float) -> None:
        cfg, seg = self.config.train, self._segment
        at, floor = seg.factor * cfg.lr, FLOOR * cfg.lr
        cosine = cfg.lr_decay == "cosine"
        how = {
            "continue": f"a new cosine from the lr it stopped at down to {floor:.3g} over the extension"
            if cosine
            else "the lr it stopped at, constant",
            "rewarm": ("warm-up to " if cfg.warmup_steps else "")
            + f"the peak {cfg.lr:.3g}, then "
            + (f"a new cosine down to {floor:.3g} over the extension" if cosine else "constant"),
            "hold": f"the lr it stopped at ({at:.3g}) to the end",
        }
        budget = f" (or {cfg.max_minutes:g} more minutes)" if cfg.max_minutes > 0 else ""
        others = ", ".join(p for p in how if p != seg.policy)
        self._note(
            f"extending {self.path} from step {seg.start} to {cfg.steps}{budget}: the lr starts at {lr:.3g}, "
            f"--extend-lr {seg.policy}: {how[seg.policy]} (it stopped at {at:.3g}; also: {others})"
        )
        done = list((self.recorded or {}).get("lr_extensions") or [])
        record = {"from_step": seg.start, "steps": cfg.steps, "max_minutes": cfg.max_minutes, "policy": seg.policy}
        self.meta["lr_extensions"] = [*done, {**record, "lr": lr}]

    def _progress(self, step: int) -> float | None:
        cfg, seg = self.config.train, self._segment
        begin = cfg.warmup_steps
        if seg is not None:
            begin = seg.start + (cfg.warmup_steps if seg.policy == "rewarm" else 0)
        if step < begin or (cfg.max_minutes <= 0 and self._progress0 is None):
            return None
        p0 = self._progress0 or 0.0
        by_steps = (step - begin) / max(1, cfg.steps - begin)
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
        self._t0 = time.monotonic() - self._spent_s
        step = self.start_step
        with StopSignals(self._note) as signals:
            self._signals = signals
            try:
                stopped_by = "steps"
                while step < cfg.steps:
                    out_of_time, signalled = self._should_stop(signals)
                    if signalled:
                        stopped_by = "signal"
                        break
                    if out_of_time and self._pauses():
                        self._note(
                            f"paused after {cfg.pause_minutes} min (train.pause_minutes) at step {step}; saving: "
                            f"a resume continues the lr schedule of the {cfg.max_minutes}-min budget (with "
                            "--set train.pause_minutes=0, or it pauses again)"
                        )
                        stopped_by = "pause"
                        break
                    if out_of_time:
                        self._note(f"time budget of {cfg.max_minutes} min spent at step {step}; saving")
                        stopped_by = "budget"
                        break
                    yield step
                    step += 1
                    self.done = step
                    if cfg.max_minutes > 0:  # the bar's total and time left follow the budget, not train.steps
                        elapsed = time.monotonic() - self._t0 - self._spent_s  # the loop's own seconds
                        self._bar.total = steps_within_budget(
                            self.start_step, step, elapsed, cfg.max_minutes, cfg.steps, self._spent_s
                        )
                    self._bar.update(1)
            finally:
                self._bar.close()
            self._stopped_by = stopped_by
            self.checkpoint(self.done)
            self._voted = None  # asked afresh: a signal may have come during the save
            if self._should_stop(signals)[1]:
                raise Stopped(f"stopped at step {self.done}; resume with --resume {self.path}", signals.received or 15)

    def _pauses(self) -> bool:
        """Whether this invocation's clock stops it at train.pause_minutes rather than at max_minutes."""
        cfg = self.config.train
        return cfg.pause_minutes > 0 and (cfg.max_minutes == 0 or cfg.pause_minutes < cfg.max_minutes)

    def _stop_flags(self) -> tuple[bool, bool]:
        """This rank's own (budget spent or pause reached, signal received), before the ranks agree."""
        cfg = self.config.train
        budget = cfg.pause_minutes if self._pauses() else cfg.max_minutes
        over = budget > 0 and time.monotonic() - self._t0 > budget * 60
        signalled = self._signals is not None and self._signals.received is not None
        return over, signalled

    def _should_stop(self, signals: StopSignals) -> tuple[bool, bool]:
        """(out of time, signalled), agreed by every rank: every rank must stop at the same step, or DDP would hang.

        Under torchrun the step's finiteness vote (`finite_parts`) carried them, so the ranks agree
        without a collective of their own; one process asks its clock and signals, which costs nothing.
        """
        if self._voted is not None:
            voted, self._voted = self._voted, None
            return voted
        self._signals = signals
        return self.runtime.any_rank(*self._stop_flags())

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
        if self._new_data is not None:
            start = 0  # --new-data: the new data is read from its start
        workers = max(1, getattr(loader, "num_workers", 0))
        recorded = self._data_position
        fast = (
            start > 0
            and hasattr(loader, "resumed")
            and recorded is not None
            and recorded["workers"] == workers
            and recorded["at"]
        )
        # The replay below records the positions again; a restart starts from the recorded ones.
        self._positions = worker_positions(recorded) if fast else {}
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

    def finite(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, part: str = "model") -> bool:
        """True when the loss and gradient norm are finite on every rank; else the step is skipped and counted.

        After train.max_nonfinite_steps in a row (for one `part`) the run stops with a
        NonFiniteError naming the step; the last checkpoint is left as it was. `finite_parts`
        does it for several parts at once.
        """
        return self.finite_parts(step, {part: (loss, grad_norm)})[part]

    def finite_parts(self, step: int, parts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, bool]:
        """For each part, name -> (loss, gradient norm): whether both are finite on every rank (see `finite`).

        The step's one wait for the device: the flags stay on it, and under torchrun the budget and
        signal flags ride in the same vector, so one all-reduce and one read decide whether each
        optimizer steps and whether the loop goes on (`_should_stop`). A part that is not finite is
        skipped and counted in the order given.
        """
        dev = self.runtime.device
        flags = [~(torch.isfinite(loss.detach()).all() & torch.isfinite(norm).all()) for loss, norm in parts.values()]
        votes = torch.stack([f.to(dev, non_blocking=True) for f in flags]).float()  # (parts,) 1.0 = not finite
        if self.runtime.distributed:
            # Python floats reach the device as kernel arguments: no host-to-device copy to wait for.
            stop = torch.stack([torch.full((), float(f), device=dev) for f in self._stop_flags()])
            votes = self.runtime.all_reduce_sum(torch.cat([votes, stop]))
        agreed = (votes > 0).tolist()
        if self.runtime.distributed:
            self._voted = (agreed[-2], agreed[-1])
        return {part: self._count_finite(step, part, bad) for part, bad in zip(parts, agreed)}

    def _count_finite(self, step: int, part: str, bad: bool) -> bool:
        if not bad:
            self._in_a_row[part] = 0
            return True
        self.nonfinite_steps += 1
        row = self._in_a_row[part] = self._in_a_row.get(part, 0) + 1
        limit = self.config.train.max_nonfinite_steps
        self._note(f"step {step + 1}: the {part}'s loss or gradient norm is not finite; step skipped ({row} in a row)")
        if row >= limit:
            kept = f"step {self._saved_step}" if self._saved_step is not None else "none yet"
            raise NonFiniteError(
                f"step {step + 1}: the {part}'s loss or gradient norm was not finite {row} steps in "
                f"a row (train.max_nonfinite_steps = {limit}); stopped, last checkpoint kept "
                f"({kept}); lower train.lr or check the data"
            )
        return False

    def checkpoint(self, step: int, meta: dict | None = None) -> None:
        """Save what `begin` named at `step` (the number of steps done); refuses weights that are not finite."""
        modules, optimizers, ema = self._tracked
        ema_weights = {"ema": ema.weights()} if ema is not None and ema.enabled else {}
        bad = nonfinite_weights(modules, ema_weights)
        if any(self.runtime.any_rank(bool(bad))):
            raise NonFiniteError(
                f"step {step}: the weights of {', '.join(bad) or 'another rank'} are not finite; "
                f"not saved, last checkpoint kept (step {self._saved_step}); lower train.lr"
            )
        self.meta.update(meta or {})
        state = {"nonfinite_steps": self.nonfinite_steps}
        if self._loss_watch is not None:
            state["loss_jumps"] = self.loss_jumps
        if self._last_progress is not None:
            state["lr_progress"] = self._last_progress
        if self._segment is not None:
            state["lr_segment"] = self._segment.to_dict()
        if self._stopped_by is not None:  # set once the loop has ended: the final save(s)
            state["stopped_by"] = self._stopped_by
        self.save(step, modules, optimizers, ema, meta=self.meta, state=state)
        self._saved_step = step

    def sample(self, step: int, make_grid: Callable[[], Any], tag: str = "samples") -> None:
        """Run a periodic sample grid on the main rank; an error in it is reported and counted, not fatal.

        make_grid: writes the grid and returns its PNG's path (or the images), which TensorBoard then
        shows under `tag` at step + 1 (the steps done), as `image` does.
        """
        if not self.runtime.is_main:
            return
        try:
            with self.runtime.fork_rng():
                picture = make_grid()
            if picture is not None:
                self.image(tag, step + 1, picture)
        except Exception as e:  # a grid is a by-product: a broken one must not end hours of training
            self.sample_errors += 1
            self._note(f"step {step + 1}: the sample grid failed ({type(e).__name__}: {e}); training goes on")

    def image(self, tag: str, step: int, picture: torch.Tensor | str | Path) -> None:
        """Show a grid in TensorBoard's IMAGES tab (main rank; MetricLogger.image): a PNG's path or images."""
        if self.logger is not None:
            self.logger.image(tag, step, picture)

    def advance(self, images: int, skipped: int = 0) -> None:
        """After the optimizer step (taken or skipped): move the lr schedule on and count the batch.

        images: the batch's size on this rank (images_per_s); skipped: the samples the reader
        skipped to make it (batch["skipped"]).
        """
        if self._schedule is not None:
            self._schedule.step()
        self._images += images
        self.skipped += skipped

    def every(self, interval: int, step: int) -> bool:
        """True after step `step` when `interval` steps have passed (counting steps from 1)."""
        return interval > 0 and (step + 1) % interval == 0

    def spend(self, seconds: float) -> None:
        """Count `seconds` of work done for the loop before it starts (a latent cache's encoding) in max_minutes.

        train.max_minutes is this invocation's budget: work that only exists to make the steps cheaper must
        come out of it, or a budgeted comparison would favour whoever moves work outside the loop.
        """
        self._spent_s += max(0.0, seconds)

    def watch_loss(self) -> None:
        """Check every logged "loss" for a jump (LossWatch at train.loss_jump; 0: off), for a loss with a floor.

        A jump is noted in one line, logged as metrics "loss_jump" (the factor) and counted: summary.json's
        "loss_jumps". The run goes on: the loss may come back, and the budget is the user's to spend. After a
        resume the watch starts afresh (the count goes on). Raises UserError for a factor in (0, 1].
        """
        factor = self.config.train.loss_jump
        if 0 < factor <= 1:
            raise UserError(f"train.loss_jump is a factor above 1 (3: a threefold rise), or 0 for off; got {factor:g}")
        self._loss_watch = LossWatch(factor) if factor > 0 else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        jump = self._loss_watch.see(step + 1, metrics["loss"]) if self._loss_watch and "loss" in metrics else None
        if jump is not None:
            self.loss_jumps += 1
            metrics = {**metrics, "loss_jump": jump.ratio}
            self._note(jump.message(self._loss_watch.window))
        elapsed = max(1e-9, time.monotonic() - self._t0 - self._spent_s)  # images_per_s: the loop's pace
        metrics = {
            **metrics,
            "images_per_s": self._images * self.runtime.world_size / elapsed,
            "skipped_samples": self.skipped,
            "nonfinite_steps": self.nonfinite_steps,
            "sample_errors": self.sample_errors,
        }
        self.logger.log(step + 1, metrics)
        if self._bar is not None:
            shown = {
                k: (f"{v:.4g}" if isinstance(v, float) else v)
                for k, v in metrics.items()
                if k in ("loss", "images_per_s", "psnr", "lr") or k.startswith("loss")
            }
            self._bar.set_postfix(shown, refresh=False)

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write summary.json (flat keys: "steps" done, then the stage's figures) and print it.

        summary.json is how scripts and people read results.
        """
        summary = {
            "steps": self.done,
            **summary,
            "skipped_samples": self.skipped,
            "nonfinite_steps": self.nonfinite_steps,
            "sample_errors": self.sample_errors,
            **({"loss_jumps": self.loss_jumps} if self._loss_watch is not None else {}),
        }
        if self.runtime.is_main:
            ckpt.write_json(self.path / "summary.json", summary)
            self.logger.log(
                summary.get("steps", 0), {f"final/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}
            )
            figures = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
            print(f"{self.stage} run {self.path}: {figures}")
        self.runtime.barrier()
        self.close()
        return summary


def _channels_last_inputs(module: torch.nn.Module, args: tuple) -> tuple:
    """A forward pre-hook: 4-d tensor arguments (images, latents: (B, C, H, W)) in torch.channels_last."""
    nhwc = torch.channels_last
    return tuple(a.contiguous(memory_format=nhwc) if torch.is_tensor(a) and a.ndim == 4 else a for a in args)


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
    """A stage's command: parse its flags, train, and turn bad input into one line and exit code 2.

    Running out of device memory is one line too, naming what makes the step fit (faults.OutOfMemory).
    """
    args = build_parser().parse_args(argv)
    with cli_errors():
        try:
            return train(args)
        except torch.OutOfMemoryError as e:
            raise OutOfMemory(_out_of_memory(e)) from e
        finally:
            close_open_runs()


def _out_of_memory(error: torch.OutOfMemoryError) -> str:
    """faults.out_of_memory_message for the run this process is training (the newest open one), if any."""
    runs = [r for r in run_directory._OPEN if isinstance(r, Run)]  # the runs stage_main closes
    if not runs:
        return out_of_memory_message(str(error))
    run = runs[-1]
    model = getattr(run.config, "model", None)
    return out_of_memory_message(
        str(error),
        where=f"{run.stage} step {run.done + 1} on {run.runtime.device}",
        kept=run._saved_step,
        batch_size=run.config.train.batch_size,
        checkpointing=getattr(model, "gradient_checkpointing", None),
        precision=run.runtime.precision,
    )
