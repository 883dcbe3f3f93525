"""Run-directory checkpoints: safetensors weights, the config and a format version beside them.

A run directory of any stage holds

    config.toml         the resolved stage config (what rebuilds the model)
    meta.json           {"stage", "format_version", "step", ...stage facts such as the latent scale}
    model.safetensors   the trained weights
    ema.safetensors     the EMA weights, when the stage keeps them
    state.pt            optimizer, step, RNG states: what `--resume` needs, nothing else

Every file is written to a temporary name and renamed into place, so a run killed mid-save
keeps its previous checkpoint. Loading never unpickles code: weights come from safetensors
and the training state through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
META = "meta.json"
CONFIG = "config.toml"
MODEL = "model.safetensors"
EMA = "ema.safetensors"
STATE = "state.pt"


class CheckpointError(ValueError):
    """A run directory that is missing, incomplete or of another stage."""


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, then rename the temporary file onto `path` (same directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    # Clone so tied parameters become separate tensors, which safetensors requires.
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state_dict.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def committed_file(run_dir: str | Path, name: str) -> Path:
    """Path of file `name` (e.g. MODEL, EMA, STATE) in the newest complete checkpoint of `run_dir`.

    Every reader of a run's checkpoint files goes through here, so the on-disk layout of a
    checkpoint is known in this module alone.
    """
    return Path(run_dir) / name


def load_weights(path: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights file {path} does not exist")
    return load_file(str(path), device=str(device))


def file_hash(path: str | Path, length: int = 16) -> str:
    """Content hash (sha256, shortened) of a file: how runs recognise each other's weights."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def tensors_hash(state_dict: dict[str, torch.Tensor], length: int = 16) -> str:
    """Content hash of a state dict, independent of file layout (names and values)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        v = state_dict[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:length]


def read_meta(run_dir: str | Path, stage: str | None = None) -> dict[str, Any]:
    """meta.json of a run directory, checking it is a run of `stage` when one is given."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    path = run_dir / META
    if not path.exists():
        raise CheckpointError(f"{run_dir} is not a latentdiff run directory (no {META}); "
                              "train one with `latentdiff train STAGE --out DIR`")
    meta = json.loads(path.read_text())
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{run_dir} was written by a newer latentdiff "
                              f"(format {meta['format_version']} > {FORMAT_VERSION}); upgrade latentdiff")
    if stage is not None and meta.get("stage") != stage:
        raise CheckpointError(f"{run_dir} is a {meta.get('stage')!r} run, not a {stage!r} run; "
                              f"pass the output directory of `latentdiff train {stage}`")
    return meta


def _numpy_state_to_tensors(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached))


def _numpy_state_from_tensors(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Training state (optimizer, step, RNGs) in a form `torch.load(weights_only=True)` reads."""
    state = dict(state)
    if "rng" in state:
        rng = dict(state["rng"])
        rng["numpy"] = _numpy_state_to_tensors(rng["numpy"])
        state["rng"] = rng
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path.parent} has no training state ({path.name}); it cannot be resumed")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "rng" in state:
        state["rng"]["numpy"] = _numpy_state_from_tensors(state["rng"]["numpy"])
    return state
