"""Where and how a stage runs: device, precision, torch.distributed, seeding.

The same command runs on one CPU, one GPU, or under `torchrun` on many: `Runtime.setup`
reads the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) and joins
the process group (gloo on CPU, nccl on GPU). Library code takes the device from tensors; only
this module decides which device a run uses (`pick_device`, for training and sampling alike), and
says so in one start-up line (`announce`).
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
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


def _cuda_index(device: torch.device | None) -> int | None:
    """The GPU whose generator a run on `device` draws from; None: the run draws on no GPU.

    device None: the current CUDA device (Runtime.setup and pick_device make it this rank's) when
    CUDA is available.
    """
    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def rng_state(device: torch.device | None = None) -> dict:
    """Every global RNG's state this process draws from, to store in a checkpoint for an exact resume.

    Python's, NumPy's and torch's CPU generator, and the generator of this rank's GPU only
    (`device`, the run's; None: the current CUDA device), under "cuda" as {"state", "index",
    "count"} (which GPU, of how many visible). A rank draws its noise on its own GPU alone, and a
    checkpoint holding every visible GPU's state could not be restored where fewer are visible.
    """
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    index = _cuda_index(device)
    if index is not None:
        state["cuda"] = {"state": torch.cuda.get_rng_state(index), "index": index, "count": torch.cuda.device_count()}
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> str | None:
    """Restore what `rng_state` saved; the GPU generator's state goes to `device` (this rank's; None: the current one).

    The GPU state is this rank's whichever GPU it was saved on (a generator's state does not depend
    on the GPU), so a checkpoint resumes on a machine with another GPU count. Checkpoints written
    before #27 hold a list of every visible GPU's state: this rank's is the entry at its device's
    index. Returns None when every generator the run draws from was restored exactly, else one line
    saying which was not (the others are restored all the same): a GPU run resumed on the CPU, a CPU
    checkpoint resumed on a GPU, an old list with no entry for this GPU.
    """
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    saved, index = state.get("cuda"), _cuda_index(device)
    differs = "so its noise after this resume differs from an uninterrupted run's"
    if index is None:
        if isinstance(saved, dict):  # saved by a run on a GPU (a CPU run saves no GPU state)
            here = device or torch.device("cpu")
            return f"the checkpoint's GPU generator (cuda:{saved['index']}) is not used by a run on {here}, {differs}"
        return None
    if saved is None:
        return (
            f"the checkpoint holds no GPU generator state (it was saved on the CPU): cuda:{index} starts from "
            f"the run's seed, {differs}"
        )
    if isinstance(saved, dict):
        torch.cuda.set_rng_state(saved["state"], index)
        return None
    if index < len(saved):  # before #27: every visible GPU's state, in index order
        torch.cuda.set_rng_state(saved[index], index)
        return None
    return (
        f"the checkpoint holds the generator states of {len(saved)} GPU(s), none for cuda:{index}: "
        f"its generator starts from the run's seed, {differs}"
    )


# How a network runs: "auto" picks per device (see `Runtime.setup` for training, `sampling_dtype` for sampling).
Precision = Literal["auto", "fp32", "bf16"]
SAMPLING_PRECISIONS: tuple[str, ...] = get_args(Precision)


def sampling_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for running a network at inference, or None for float32.

    "auto" is bf16 on CUDA, and on CPUs with AMX tiles (Intel Sapphire Rapids and later), where
    bf16 sampling is faster at large batches; float32 elsewhere (docs/benchmarks.md, What was made
    faster). The choice depends on the device alone, never on the rows per pass, so an image does
    not change with the batch it is made in. Training keeps its own `precision` (on the CPU bf16
    training was slower: the same page). Under autocast the samplers'
    arithmetic stays float32: only the network runs in bf16.
    """
    if precision not in SAMPLING_PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(SAMPLING_PRECISIONS)}")
    if precision == "auto":
        amx = device.type == "cpu" and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        precision = "bf16" if device.type == "cuda" or amx else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


@dataclass(frozen=True)
class Launch:
    """Where torchrun put this process (from the variables it sets); a plain process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1  # processes in the job, over every machine
    local_rank: int = 0  # this process's index on its machine: the GPU it takes
    local_world_size: int = 1  # processes on this machine

    @classmethod
    def from_env(cls) -> Launch:
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))  # torchrun sets it; others: all on one machine
        return cls(int(env.get("RANK", "0")), world, int(env.get("LOCAL_RANK", "0")), local_world)


# What an NVIDIA driver puts on a machine whether or not this torch build can use the GPU.
NVIDIA_DEVICE_FILES: tuple[str, ...] = ("/dev/nvidia0", "/proc/driver/nvidia/version")


def unusable_gpu_warning() -> str | None:
    """One line when the machine shows an NVIDIA GPU that this CUDA build of torch cannot use, else None.

    The usual cause is a driver older than the build's CUDA needs: torch.cuda.is_available() is then
    False and a run would train on the CPU, 100-1000x slower, behind a normal-looking progress bar.
    """
    if torch.version.cuda is None or torch.cuda.is_available():
        return None  # a CPU build cannot use a GPU whatever the driver; or the GPU works
    seen = [f for f in NVIDIA_DEVICE_FILES if Path(f).exists()]
    count = torch.cuda.device_count()
    if not seen and count == 0:
        return None
    shows = seen[0] if seen else f"{count} CUDA device(s)"
    return (
        f"WARNING: this machine has an NVIDIA GPU ({shows}) that torch {torch.__version__}, built for CUDA "
        f"{torch.version.cuda}, cannot use (torch.cuda.is_available() is False: most often a driver older than "
        "that CUDA needs), so this runs on the CPU, 100x slower or worse: update the NVIDIA driver (nvidia-smi "
        "shows the CUDA version it supports) or install the torch build for it (pip install torch --index-url "
        "https://download.pytorch.org/whl/cuXYZ); pass --device cpu to use the CPU on purpose"
    )


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
        if dev.type == "cuda" and unusable_gpu_warning() is not None:
            raise UserError(
                f"--device {name}: torch {torch.__version__} (built for CUDA {torch.version.cuda}) cannot use this "
                "machine's NVIDIA GPU: update the NVIDIA driver, or install the torch build for the driver's CUDA"
            )
        raise UserError(
            f"--device {name}: this machine has no {dev.type} device that torch {torch.__version__} "
            "can use; leave --device out to use the best one there is"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def pick_device(name: str | torch.device | None = None, local_rank: int | None = None) -> torch.device:
    """The device this process runs on, made current: training (Runtime.setup) and sampling both choose here.

    name: `--device` (checked by parse_device), a torch.device a caller already chose, or None for
    this process's GPU when there is one, else the CPU. A CUDA device always ends indexed and
    current (torch.cuda.set_device needs an index; kernels and `torch.cuda` calls that name no
    device then go to it): "cuda" is cuda:LOCAL_RANK under torchrun, cuda:0 otherwise; cuda:N stays.
    Under torchrun with several processes on this machine, `--device cuda:N` would put them all on
    GPU N, so it is refused rather than remapped: GPUs are chosen with CUDA_VISIBLE_DEVICES, which
    every process sees alike. local_rank: this process's GPU index (default: torchrun's LOCAL_RANK, 0).
    Raises UserError (one line) for a device this machine lacks, or more processes than GPUs.
    """
    launch = Launch.from_env()
    local = launch.local_rank if local_rank is None else local_rank
    if isinstance(name, torch.device):
        dev = name
    elif name:
        dev = parse_device(name)
    else:
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if dev.type != "cuda":
        return dev
    if dev.index is None:
        count = torch.cuda.device_count()
        if local >= count:
            raise UserError(
                f"LOCAL_RANK {local} needs GPU {local}, but only {count} GPU(s) are visible here: start at most "
                f"{count} process(es) per machine (torchrun --nproc-per-node {count}), or see CUDA_VISIBLE_DEVICES"
            )
        dev = torch.device("cuda", local)
    elif isinstance(name, str) and launch.local_world_size > 1:
        raise UserError(
            f"--device {name} under torchrun would put all {launch.local_world_size} processes of this machine on "
            f"GPU {dev.index}: pass --device cuda (each process takes the GPU of its LOCAL_RANK) and choose the GPUs "
            "with CUDA_VISIBLE_DEVICES"
        )
    torch.cuda.set_device(dev)
    return dev


def sampling_precision(device: torch.device, precision: str = "auto") -> str:
    """`precision` as it runs on `device` ("fp32" or "bf16"; see sampling_dtype), for the start-up line."""
    return "bf16" if sampling_dtype(device, precision) == torch.bfloat16 else "fp32"


def _cudnn_version() -> str | None:
    try:
        v = torch.backends.cudnn.version()
    except (RuntimeError, OSError):
        return None
    if not v:
        return None
    # cuDNN 9 numbers its versions major*10000 + minor*100 + patch; cuDNN 8 and older major*1000 + minor*100 + patch
    major, rest = (v // 10000, v % 10000) if v >= 90000 else (v // 1000, v % 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def build_versions() -> str:
    """What this torch was built for: "CUDA 12.8, cuDNN 9.1.0", "ROCm 6.2" or "CPU build"."""
    if torch.version.cuda is not None:
        cudnn = _cudnn_version()
        return f"CUDA {torch.version.cuda}" + (f", cuDNN {cudnn}" if cudnn else ", no cuDNN")
    hip = getattr(torch.version, "hip", None)
    return f"ROCm {hip}" if hip else "CPU build"


def startup_line(device: torch.device, precision: str, world_size: int = 1, deterministic: bool = False) -> str:
    """One line saying where and how a command runs: the device (a GPU's name and memory), precision, versions."""
    where = str(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where += f" ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    elif device.type == "cpu":
        threads = torch.get_num_threads()
        where += f" ({threads} thread{'' if threads == 1 else 's'})"
    return (
        f"running on {where}, precision {precision}, torch {torch.__version__} ({build_versions()}), "
        f"world size {world_size}, deterministic kernels {'on' if deterministic else 'off'}"
    )


def announce(
    device: torch.device, precision: str, *, asked: str | None, world_size: int = 1, deterministic: bool = False
) -> None:
    """Print the start-up line (stdout, with a run's other notes; stderr keeps errors one line).

    On the CPU with no --device asked for, an NVIDIA GPU torch cannot use is also said, on stderr.
    """
    print(startup_line(device, precision, world_size, deterministic), flush=True)
    warning = unusable_gpu_warning() if device.type == "cpu" and not asked else None
    if warning:
        print(warning, file=sys.stderr, flush=True)


# CUBLAS_WORKSPACE_CONFIG values that make cuBLAS deterministic (CUDA docs, "Results reproducibility").
DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")


def use_deterministic_kernels(on: bool) -> None:
    """Deterministic kernels on or off, process-wide (train.deterministic; docs/devices.md).

    On: torch.use_deterministic_algorithms (an op with no deterministic kernel warns, naming itself,
    rather than stopping a run hours in), cuDNN deterministic with its benchmark off, and
    CUBLAS_WORKSPACE_CONFIG, which cuBLAS reads once, when CUDA first uses it: call this before
    anything touches CUDA. Same GPU, software and batch: the same numbers. Not promised: the same
    numbers at another batch size or on another GPU (kernels differ by shape and architecture).
    """
    if on and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in DETERMINISTIC_CUBLAS:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = DETERMINISTIC_CUBLAS[0]
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    if on:
        torch.backends.cudnn.benchmark = False  # benchmarking picks the fastest kernel per run, not the same one


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    deterministic: bool = False  # deterministic kernels (use_deterministic_kernels)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def setup(
        cls, seed: int, precision: str = "auto", device: str | None = None, deterministic: bool = False
    ) -> Runtime:
        """Pick the device (indexed and current: pick_device), join torchrun's process group if any, seed every RNG.

        precision "auto" is bf16 autocast on CUDA and fp32 on CPU, where bf16 autocast trains
        slower (docs/benchmarks.md, What was made faster). deterministic: deterministic
        kernels on (or off) for the whole process (use_deterministic_kernels).
        Raises UserError (one line) for a device this machine lacks (pick_device).
        """
        use_deterministic_kernels(deterministic)  # first: cuBLAS reads its workspace setting when CUDA starts
        launch = Launch.from_env()
        world_size, rank, local_rank = launch.world_size, launch.rank, launch.local_rank
        dev = pick_device(device, local_rank)
        if dev.type == "cuda":
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
        return cls(dev, rank, world_size, local_rank, precision, deterministic)

    def announce(self, asked: str | None) -> None:
        """The start-up line (`announce`), on the main rank; asked: --device as given (None: chosen here)."""
        if self.is_main:
            announce(
                self.device, self.precision, asked=asked, world_size=self.world_size, deterministic=self.deterministic
            )

    def record(self) -> dict:
        """What the start-up line says, for a run's meta.json ("runtime")."""
        gpu = torch.cuda.get_device_properties(self.device).name if self.device.type == "cuda" else None
        return {
            "device": str(self.device),
            "gpu": gpu,
            "precision": self.precision,
            "torch": torch.__version__,
            "build": build_versions(),
            "world_size": self.world_size,
            "deterministic": self.deterministic,
        }

    def autocast(self):
        """bf16 autocast when asked for, else a no-op context."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel under torchrun, the model itself otherwise.

        A model sharded by FSDP (train.parallel "fsdp", core.sharding.shard_model) is returned as
        it is: it already gathers its weights and reduces its gradients over the processes.
        """
        from .sharding import is_sharded

        if not self.distributed or is_sharded(model):
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
