"""What a training run does on each fault: a second writer, a signal, a number that is not finite.

`Run` (core/train.py) uses these; docs/reliability.md says what each one
guarantees. Every decision that several ranks must take together goes through
`Runtime.any_rank`, so all ranks stop, skip or save at the same step.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from .errors import UserError

LOCK = "run.lock"  # the lock file in a run directory (held for the run's life)
LOCK_HOLDER = "run.lock.json"  # who holds it: pid, host, since


class RunLocked(UserError):
    """Another process is writing the same run directory."""


class NonFiniteError(UserError):
    """Training produced numbers that are not finite for too many steps in a row."""


class OutOfMemory(UserError):
    """A training step needed more device memory than there is."""


def out_of_memory_message(
    error: str,
    where: str = "training",
    kept: int | None = None,
    batch_size: int | None = None,
    checkpointing: bool | None = None,
    precision: str | None = None,
) -> str:
    """One line for torch.OutOfMemoryError in a run: what ran out, the checkpoint kept, the fixes in order.

    The fixes, cheapest in quality first: a smaller batch (activations shrink with it), gradient
    checkpointing (recompute activations in backward, ~30% slower; offered where the model has the
    switch, `checkpointing` not None, and it is off), bf16 autocast (half the activation memory;
    offered unless the run already uses it). The step's state is not saved: the optimizer may
    have stopped halfway, so the last checkpoint is what a resume continues from.
    """
    asked = re.search(r"Tried to allocate [\d.]+ \w+", error)
    fixes = []
    if batch_size is not None and batch_size > 1:
        fixes.append(f"a smaller train.batch_size (now {batch_size}: --batch-size {max(1, batch_size // 2)})")
    if checkpointing is False:
        fixes.append("--set model.gradient_checkpointing=true")
    if precision is not None and precision != "bf16":
        fixes.append('--set train.precision="bf16"')
    if not fixes:
        fixes.append("a smaller model preset")
    saved = f"step {kept}" if kept is not None else "none yet"
    return (
        f"{where}: out of device memory ({asked.group(0).lower() if asked else 'torch.OutOfMemoryError'}); "
        f"stopped, last checkpoint kept ({saved}); to fit, try in this order: {', then '.join(fixes)}"
    )


class RunLock:
    """An exclusive lock on a run directory (the `filelock` package), with the holder recorded beside it.

    A second process that tries to write the same run gets a one-line error naming the holder
    (pid and host). The operating system drops the lock when the holder dies, so a killed run
    never leaves its directory locked.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._lock = FileLock(str(self.run_dir / LOCK))

    def acquire(self) -> None:
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise RunLocked(
                f"{self.run_dir} is in use by {self.holder()}; wait for it to end, or pass another --out"
            ) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        (self.run_dir / LOCK_HOLDER).write_text(json.dumps(holder) + "\n")

    def holder(self) -> str:
        try:
            h = json.loads((self.run_dir / LOCK_HOLDER).read_text())
            return f"pid {h['pid']} on {h['host']} (since {h['since']})"
        except (OSError, ValueError, KeyError):
            return "another process"

    def release(self) -> None:
        if self._lock.is_locked:
            (self.run_dir / LOCK_HOLDER).unlink(missing_ok=True)
            self._lock.release()


class StopSignals:
    """While active, SIGTERM and SIGINT only set a flag: the loop finishes its step, saves and stops.

    A second SIGINT (Ctrl-C twice) restores the default handler and interrupts at once.
    Only the main thread can install handlers; elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, note=print):
        self.received: int | None = None
        self._note = note
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.received = signum
        self._note(
            f"{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
            "(Ctrl-C again to abort without saving)"
        )

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def nonfinite_weights(modules: dict[str, torch.nn.Module], extra: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Names of the modules (and extra state dicts such as the EMA) holding a tensor that is not finite."""
    bad = []
    named = {**{k: m.state_dict() for k, m in modules.items()}, **extra}
    for name, state in named.items():
        if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in state.values()):
            bad.append(name)
    return bad
