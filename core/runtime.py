"""Where and how a stage runs: device, precision, torch.distributed, seeding.

The same command runs on one CPU, one GPU, or under `torchrun` on many: `Runtime.setup`
reads the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK) and joins the process
group (gloo on CPU, nccl on GPU). Library code takes the device from tensors; only this
module decides which device a run uses.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
import torch.distributed as dist

from .errors import UserError


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one user seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG's state, to store in a checkpoint for an exact resume."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# How a network runs: "auto" picks per device (see `Runtime.setup` for training, `sampling_dtype` for sampling).
Precision = Literal["auto", "fp32", "bf16"]
SAMPLING_PRECISIONS: tuple[str, ...] = get_args(Precision)


def sampling_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for running a network at inference, or None for float32.

    "auto" is bf16 on CUDA, and on CPUs with AMX tiles (Intel Sapphire Rapids and later), where
    bench/ measured the sampling loop 1.3x faster at 128 rows per pass (at 8 rows it was 10% slower,
    README, Speed); float32 elsewhere. The choice depends on the device alone, never on the rows per
    pass, so an image does not change with the batch it is made in. Training keeps its own
    `precision` (bf16 autocast made the CPU backward 2x slower). Under autocast the samplers'
    arithmetic stays float32: only the network runs in bf16.
    """
    if precision not in SAMPLING_PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(SAMPLING_PRECISIONS)}")
    if precision == "auto":
        amx = device.type == "cpu" and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        precision = "bf16" if device.type == "cuda" or amx else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def parse_device(name: str) -> torch.device:
    """`--device NAME` as a torch.device that this machine has; UserError otherwise (one line)."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
    }
    if not available.get(dev.type, False):
        raise UserError(
            f"--device {name}: this machine has no {dev.type} device that torch {torch.__version__} "
            "can use; leave --device out to use the best one there is"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def pick_device(name: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """The device named by `--device` (checked), else this process's GPU when there is one, else the CPU."""
    if isinstance(name, torch.device):
        return name
    if name:
        return parse_device(name)
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    precision: str = "fp32"  # "fp32" or "bf16" (autocast)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def setup(cls, seed: int, precision: str = "auto", device: str | None = None) -> Runtime:
        """Pick the device, join torchrun's process group if launched by it, seed every RNG.

        precision "auto" is bf16 autocast on CUDA and fp32 on CPU, where bf16 autocast was
        measured slower (CALIBRATION.md: 0.76 vs 0.65 s/step).
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = pick_device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        if precision == "auto":
            precision = "bf16" if dev.type == "cuda" else "fp32"
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision {precision!r}: choose auto, fp32 or bf16")
        # Each rank draws different noise and dropout, but the same seed gives the same run.
        seed_everything(seed + rank)
        return cls(dev, rank, world_size, local_rank, precision)

    def autocast(self):
        """bf16 autocast when asked for, else a no-op context."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel under torchrun, the model itself otherwise."""
        if not self.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def fork_rng(self):
        """A context after which the global RNGs (CPU and this device's) are as they were before.

        For work between training steps that must not shift the training noise, so a resumed
        run draws exactly what a straight run draws.
        """
        if self.device.type == "cpu":
            return torch.random.fork_rng(devices=[])
        return torch.random.fork_rng(devices=[self.device], device_type=self.device.type)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average a tensor over ranks (for logging and evaluation figures)."""
        if not self.distributed:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def any_rank(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, true when it is true on any rank: how ranks agree to stop, skip or save together.

        The collective runs on this runtime's device (NCCL reduces device tensors only).
        """
        if not self.distributed:
            return tuple(bool(f) for f in flags)
        votes = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(votes, op=dist.ReduceOp.SUM)
        return tuple(bool(v > 0) for v in votes.tolist())

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers (for a module not wrapped in DDP)."""
        if self.distributed:
            for t in module.state_dict().values():
                dist.broadcast(t, src=0)

    def average_gradients(self, module: torch.nn.Module) -> None:
        """Average a module's gradients over ranks after backward (what DDP does for the model it wraps)."""
        if self.distributed:
            for p in module.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                    p.grad.div_(self.world_size)

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module under DDP or torch.compile wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
