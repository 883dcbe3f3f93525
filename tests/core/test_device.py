"""Devices (#27, H1): every --device resolves to an indexed device that is made current; each rank saves and
restores only its own GPU's RNG state; one start-up line says where and how a run runs; deterministic kernels.

No GPU is needed: `FakeCuda` stands in for torch.cuda (device count, set_device, per-device generators,
device properties) and behaves as torch does where it matters (set_device refuses a device without an
index, a generator index past the visible GPUs raises IndexError). The test marked for CUDA runs the same
paths on a real GPU.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import pytest
import torch
from torch._utils import _get_device_index

from latentdiff.autoencoder.stage import main as autoencoder_main
from latentdiff.core import checkpoint as ckpt
from latentdiff.core import runtime
from latentdiff.core.errors import UserError
from latentdiff.core.runtime import Runtime, pick_device, rng_state, set_rng_state
from tests.helpers import AE_ARGS

TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class FakeCuda:
    """torch.cuda with `count` GPUs: records set_device, keeps one RNG state (a byte tensor) per GPU."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int):
        self.count = count
        self.current = 0
        self.set_calls: list[torch.device | int] = []
        self.cublas_at_set: list[str | None] = []  # CUBLAS_WORKSPACE_CONFIG when set_device ran
        self.states = {i: torch.tensor([i, 7, 7], dtype=torch.uint8) for i in range(count)}
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(cuda, "set_device", self.set_device)
        monkeypatch.setattr(cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(cuda, "get_rng_state_all", lambda: [self.get_rng_state(i) for i in range(self.count)])
        monkeypatch.setattr(cuda, "set_rng_state_all", self.set_rng_state_all)
        props = types.SimpleNamespace(name="Fake H100", total_memory=80 * 2**30)
        monkeypatch.setattr(cuda, "get_device_properties", lambda device=None: props)

    def _index(self, device) -> int:
        if isinstance(device, str):
            device = torch.device(device)
        if isinstance(device, torch.device) and device.index is None:
            return self.current  # torch: "cuda" means the current device
        index = _get_device_index(device)
        if index >= self.count:
            raise IndexError(f"no CUDA device {index}: {self.count} visible")  # torch's default_generators[index]
        return index

    def set_device(self, device) -> None:
        self.set_calls.append(device)
        self.cublas_at_set.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        self.current = _get_device_index(device)  # raises for a device without an index, as torch does

    def get_rng_state(self, device="cuda") -> torch.Tensor:
        return self.states[self._index(device)].clone()

    def set_rng_state(self, state: torch.Tensor, device="cuda") -> None:
        self.states[self._index(device)] = state.clone()

    def set_rng_state_all(self, states) -> None:
        for i, state in enumerate(states):
            self.set_rng_state(state, i)


@pytest.fixture(autouse=True)
def _restore_torch_settings(monkeypatch):
    """Runtime.setup changes process-wide settings (TF32, deterministic kernels): put them back for other tests."""
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[4], saved[5]


def torchrun(monkeypatch, rank: int, world: int, local_rank: int, local_world: int) -> None:
    for name, value in zip(TORCHRUN_ENV, (world, rank, local_rank, local_world)):
        monkeypatch.setenv(name, str(value))


# ---------------------------------------------------------------- 1. device resolution


def test_setup_with_cuda_resolves_an_index_and_makes_it_current(monkeypatch):
    gpus = FakeCuda(monkeypatch, count=2)
    rt = Runtime.setup(0, "auto", "cuda")
    assert rt.device == torch.device("cuda", 0)
    assert gpus.set_calls == [torch.device("cuda", 0)]
    assert rt.precision == "bf16"


def test_every_device_choice_is_indexed_and_current(monkeypatch):
    gpus = FakeCuda(monkeypatch, count=2)
    assert pick_device(None) == torch.device("cuda", 0)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    # What a caller hands over as a torch.device (evaluate passes its runtime's) gets an index too.
    assert pick_device(torch.device("cuda")) == torch.device("cuda", 0)
    assert [_get_device_index(d) for d in gpus.set_calls] == [0, 1, 0]
    assert all(isinstance(d, int) or d.index is not None for d in gpus.set_calls)
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match=r"--device cuda:2: only 2 CUDA device\(s\) here"):
        pick_device("cuda:2")


def test_under_torchrun_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    gpus = FakeCuda(monkeypatch, count=4)
    torchrun(monkeypatch, rank=5, world=8, local_rank=1, local_world=4)
    assert pick_device("cuda") == torch.device("cuda", 1)
    assert pick_device(None) == torch.device("cuda", 1)
    assert [_get_device_index(d) for d in gpus.set_calls] == [1, 1]
    # An explicit GPU would put the 4 processes of this machine on one GPU: refused in one line.
    with pytest.raises(UserError, match=r"--device cuda:0 under torchrun would put all 4 processes") as e:
        pick_device("cuda:0")
    assert "\n" not in str(e.value) and "CUDA_VISIBLE_DEVICES" in str(e.value)
    # One process per machine (multi-node, --nproc-per-node 1): its GPU may be named.
    torchrun(monkeypatch, rank=1, world=2, local_rank=0, local_world=1)
    assert pick_device("cuda:3") == torch.device("cuda", 3)


def test_more_processes_than_gpus_is_refused_in_one_line(monkeypatch):
    FakeCuda(monkeypatch, count=2)
    torchrun(monkeypatch, rank=2, world=4, local_rank=2, local_world=4)
    with pytest.raises(UserError, match=r"LOCAL_RANK 2 .* only 2 GPU\(s\) are visible") as e:
        pick_device("cuda")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- 2. RNG state, per rank


def round_trip(state: dict, tmp_path: Path) -> dict:
    """Through a checkpoint's training state file, as a resume reads it (weights_only)."""
    ckpt.save_state(tmp_path / "state.pt", {"step": 1, "rng": state})
    return ckpt.load_state(tmp_path / "state.pt")["rng"]


def test_rng_state_holds_only_this_ranks_gpu(monkeypatch, tmp_path):
    gpus = FakeCuda(monkeypatch, count=2)
    state = round_trip(rng_state(torch.device("cuda", 1)), tmp_path)
    assert state["cuda"]["index"] == 1 and state["cuda"]["count"] == 2
    assert torch.equal(state["cuda"]["state"], gpus.states[1])
    # Same count: restored to this rank's GPU, exactly, the others untouched.
    gpus.states = {0: torch.zeros(3, dtype=torch.uint8), 1: torch.zeros(3, dtype=torch.uint8)}
    assert set_rng_state(state, torch.device("cuda", 1)) is None
    assert torch.equal(gpus.states[1], torch.tensor([1, 7, 7], dtype=torch.uint8))
    assert not gpus.states[0].any()


def test_rng_state_resumes_where_fewer_gpus_are_visible(monkeypatch, tmp_path):
    saved_on = FakeCuda(monkeypatch, count=4)
    state = round_trip(rng_state(torch.device("cuda", 3)), tmp_path)
    resumed_on = FakeCuda(monkeypatch, count=1)
    assert set_rng_state(state, torch.device("cuda", 0)) is None  # this rank's stream, on the GPU it has now
    assert torch.equal(resumed_on.states[0], saved_on.states[3])


def test_rng_state_resumes_where_more_gpus_are_visible(monkeypatch, tmp_path):
    saved_on = FakeCuda(monkeypatch, count=1)
    state = round_trip(rng_state(torch.device("cuda", 0)), tmp_path)
    resumed_on = FakeCuda(monkeypatch, count=8)
    before = {i: s.clone() for i, s in resumed_on.states.items()}
    assert set_rng_state(state, torch.device("cuda", 0)) is None
    assert torch.equal(resumed_on.states[0], saved_on.states[0])
    assert all(torch.equal(resumed_on.states[i], before[i]) for i in range(1, 8))


def test_old_checkpoints_with_every_gpus_state_still_load(monkeypatch, tmp_path):
    old = round_trip(
        {**rng_state(torch.device("cpu")), "cuda": [torch.full((3,), i, dtype=torch.uint8) for i in range(4)]}, tmp_path
    )
    # Fewer GPUs than the list holds (the IndexError of #27): this rank's entry is restored.
    gpus = FakeCuda(monkeypatch, count=2)
    assert set_rng_state(old, torch.device("cuda", 1)) is None
    assert torch.equal(gpus.states[1], torch.full((3,), 1, dtype=torch.uint8))
    gpus = FakeCuda(monkeypatch, count=2)
    gpus.current = 1  # no device given: the current one, which Runtime.setup made this rank's
    assert set_rng_state(old) is None
    assert torch.equal(gpus.states[1], torch.full((3,), 1, dtype=torch.uint8))
    assert torch.equal(gpus.states[0], torch.tensor([0, 7, 7], dtype=torch.uint8))
    # More GPUs than the list holds: nothing to restore for this rank's GPU; one line says so.
    gpus = FakeCuda(monkeypatch, count=8)
    note = set_rng_state(old, torch.device("cuda", 5))
    assert note is not None and "cuda:5" in note and "\n" not in note
    assert torch.equal(gpus.states[5], torch.tensor([5, 7, 7], dtype=torch.uint8))


def test_a_cuda_state_resumed_on_the_cpu_says_so(monkeypatch, tmp_path):
    FakeCuda(monkeypatch, count=1)
    state = round_trip(rng_state(torch.device("cuda", 0)), tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    a = torch.rand(3)
    note = set_rng_state(state, torch.device("cpu"))
    assert note is not None and "GPU generator (cuda:0)" in note and "\n" not in note
    assert torch.equal(torch.rand(3), a)  # the CPU generator is restored all the same


# ---------------------------------------------------------------- 3. the start-up line


def test_startup_line_on_the_cpu_names_torch_and_the_build():
    line = runtime.startup_line(torch.device("cpu"), "fp32")
    assert "\n" not in line
    for part in ("cpu", "fp32", f"torch {torch.__version__}", "world size 1", "deterministic kernels off"):
        assert part in line, (part, line)
    assert (f"CUDA {torch.version.cuda}" in line) if torch.version.cuda else ("CPU build" in line)


def test_startup_line_on_a_gpu_names_it_and_its_memory(monkeypatch):
    FakeCuda(monkeypatch, count=2)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    line = runtime.startup_line(torch.device("cuda", 1), "bf16", world_size=8, deterministic=True)
    for part in (
        "cuda:1 (Fake H100, 80.0 GiB)",
        "bf16",
        "CUDA 12.8",
        "cuDNN 9.1.0",
        "world size 8",
        "deterministic kernels on",
    ):
        assert part in line, (part, line)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU build" in runtime.startup_line(torch.device("cpu"), "fp32")


def test_a_gpu_torch_cannot_use_is_said_loudly(monkeypatch, tmp_path, capsys):
    """A driver too old for the build: is_available() is False though the machine shows an NVIDIA GPU."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(runtime, "NVIDIA_DEVICE_FILES", (str(tmp_path / "nvidia0"),))
    assert runtime.unusable_gpu_warning() is None  # no NVIDIA GPU here
    (tmp_path / "nvidia0").touch()
    warning = runtime.unusable_gpu_warning()
    assert warning is not None and "\n" not in warning
    assert "driver" in warning and "--device cpu" in warning and "13.0" in warning
    runtime.announce(torch.device("cpu"), "fp32", asked=None)
    said = capsys.readouterr()
    assert said.err.strip() == warning and said.out.startswith("running on cpu")
    runtime.announce(torch.device("cpu"), "fp32", asked="cpu")  # the CPU on purpose: no warning
    assert warning not in capsys.readouterr().err
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build cannot use a GPU anyway: nothing to fix
    assert runtime.unusable_gpu_warning() is None


def test_training_prints_the_line_and_records_the_runtime(data, tmp_path, capsys):
    run = tmp_path / "ae"
    autoencoder_main(["--data", str(data), "--out", str(run), "--steps", "1", *AE_ARGS, "--deterministic"])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("running on "))
    assert "cpu" in line and "deterministic kernels on" in line and f"torch {torch.__version__}" in line
    meta = json.loads((run / "meta.json").read_text())
    assert meta["runtime"]["deterministic"] is True and meta["runtime"]["device"] == "cpu"
    assert meta["runtime"]["torch"] == torch.__version__ and meta["runtime"]["world_size"] == 1
    assert "deterministic = true" in (run / "config.toml").read_text()


def test_generate_prints_the_line(prior_run, tmp_path, capsys):
    from latentdiff.scripts.generate import main as generate_main

    generate_main(
        [
            "a circle",
            "--run",
            str(prior_run[0]),
            "--out",
            str(tmp_path / "g"),
            "--n",
            "1",
            "--steps",
            "1",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    # The precision `auto` picks for this CPU: bf16 where it has AMX tiles, else fp32.
    from latentdiff.core.runtime import sampling_dtype

    expected = "bf16" if sampling_dtype(torch.device("cpu")) == torch.bfloat16 else "fp32"
    assert any(line.startswith("running on cpu") and f"precision {expected}" in line for line in out.splitlines()), out


# ---------------------------------------------------------------- 4. deterministic kernels


def test_deterministic_switch_takes_effect_and_is_undone(monkeypatch):
    rt = Runtime.setup(0, "fp32", "cpu", deterministic=True)
    assert rt.deterministic and torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    rt = Runtime.setup(0, "fp32", "cpu")
    assert not rt.deterministic and not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.deterministic


def test_cublas_workspace_is_set_before_cuda_is_touched(monkeypatch):
    gpus = FakeCuda(monkeypatch, count=1)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")  # not a deterministic setting: replaced
    Runtime.setup(0, "fp32", "cuda", deterministic=True)
    assert gpus.cublas_at_set == [":4096:8"]


# ---------------------------------------------------------------- on a real GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_real_gpu_the_device_is_current_and_its_noise_resumes():
    rt = Runtime.setup(0, "auto", "cuda")
    assert rt.device.index is not None and torch.cuda.current_device() == rt.device.index
    state = rng_state(rt.device)
    a = torch.randn(4, device=rt.device)
    assert set_rng_state(state, rt.device) is None
    assert torch.equal(torch.randn(4, device=rt.device), a)
