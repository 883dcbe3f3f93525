"""Reading runs back: one way to rebuild a trained model, and the paths a run records.

Every stage's loader (autoencoder, decoder, text, classifier, the prior's pipeline) is a thin
wrapper over `load_run`, which

    1. reads meta.json and checks the stage and the format version (core.checkpoint.read_meta),
    2. rebuilds the model from config.toml alone (the stage says which class: `build(config, meta)`),
    3. picks the EMA weights when the run kept them (or the raw ones when asked),
    4. loads them strictly, moves the model to the device, freezes it (eval, no gradients),
    5. hashes the weights it loaded (core.checkpoint.tensors_hash).

Paths a run records (its data, the frozen stages it was trained with) must work from any working
directory and after the whole tree was moved: `record_path` keeps the resolved absolute path and
the path relative to the run directory; `find_recorded` tries the first, then the second. The
content hashes the stages check afterwards prove that what was found is what was recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from . import checkpoint as ckpt
from .config import load_toml
from .errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class LoadedRun:
    """A run rebuilt by `load_run`: the frozen model and what it was built from."""

    path: Path  # the run directory, resolved
    meta: dict[str, Any]  # meta.json
    config: Any  # config.toml, as the stage's config dataclass
    model: torch.nn.Module  # frozen, in eval mode, on the requested device
    weights_hash: str  # content hash of the weights loaded (EMA or raw)


def read_config(run_dir: str | Path, config_cls: type[T]) -> T:
    """The run's config.toml as `config_cls` (strict: an unknown key is an error)."""
    return load_toml(config_cls, ckpt.committed_file(run_dir, ckpt.CONFIG))


def load_run(
    run_dir: str | Path,
    stage: str,
    config_cls: type,
    build: Callable[[Any, dict], torch.nn.Module],
    *,
    device: torch.device | str = "cpu",
    ema: bool = True,
    needs: tuple[str, ...] = (),
) -> LoadedRun:
    """Rebuild the model of a `latentdiff train STAGE` run from its directory alone, frozen.

    build(config, meta): the stage's model, untrained (e.g. `lambda cfg, meta: UNet(cfg.model)`).
    ema: load ema.safetensors when the run kept an EMA (meta "ema"), model.safetensors otherwise.
    needs: meta.json keys that a finished run has; a run without them was stopped before its
    first checkpoint, and the error says how to resume it.
    Raises CheckpointError for a missing run, another stage, a newer format, or weights that do
    not fit the config; ConfigError for a config.toml that no longer loads.
    """
    run_dir = Path(run_dir)
    meta = ckpt.read_meta(run_dir, stage)
    missing = [k for k in needs if meta.get(k) is None]
    if missing:
        raise ckpt.CheckpointError(
            f"{run_dir} has no {missing[0]} in meta.json yet: its training did not finish; "
            f"resume it with `latentdiff train {stage} --resume {run_dir}`"
        )
    config = read_config(run_dir, config_cls)
    model = build(config, meta)
    state = ckpt.load_weights(ckpt.committed_file(run_dir, ckpt.EMA if ema and meta.get("ema") else ckpt.MODEL))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ckpt.CheckpointError(
            f"weights in {run_dir} do not fit its config.toml: {' '.join(line.strip() for line in first)}"
        ) from None
    model.to(device).eval().requires_grad_(False)
    return LoadedRun(run_dir.resolve(), meta, config, model, ckpt.tensors_hash(state))


# ---- paths a run records ----------------------------------------------------------------------


def is_local(path: str) -> bool:
    """False for what the data reader streams (`pipe:` commands, URLs); True for file-system paths."""
    return not (path.startswith("pipe:") or "://" in path)


def record_path(path: str | Path, run_dir: str | Path) -> dict[str, str]:
    """How a run writes down a path it depends on: resolved, and relative to the run directory.

    A path that is not local (a `pipe:` command, a URL) is kept as given.
    """
    text = str(path)
    if not is_local(text):
        return {"path": text}
    absolute = Path(text).expanduser().resolve()
    return {"path": str(absolute), "from_run": os.path.relpath(absolute, Path(run_dir).resolve())}


def _exists(path: Path) -> bool:
    # a shard pattern such as data/x/train-{000000..000003}.tar exists when its folder does
    return path.exists() or ("{" in path.name and path.parent.is_dir())


def find_recorded(record: dict[str, str] | str, run_dir: str | Path, what: str, flag: str) -> str:
    """The path a run recorded (`record_path`'s dict, or an older run's plain string), found from here.

    The absolute path first; when the tree was moved, the same place relative to the run directory.
    Only local paths are read back from a run: a `pipe:` command or URL is accepted from the command
    line alone (it would run or fetch whatever the run's files say). Raises UserError (one line).
    """
    record = {"path": record} if isinstance(record, str) else record
    path = record["path"]
    if not is_local(path):
        raise UserError(
            f"{run_dir} records {what} {path!r}, which is not a local path; such sources are only "
            f"taken from the command line: pass {flag} again"
        )
    if _exists(Path(path)):
        return path
    relative = record.get("from_run")
    if relative is not None and _exists(Path(run_dir) / relative):
        return str((Path(run_dir) / relative).resolve())
    raise UserError(
        f"{run_dir} records {what} {path}, which no longer exists (nor relative to the run); pass {flag} PATH"
    )


def recorded_data(run_dir: str | Path, stage: str) -> str | None:
    """The --data a run was trained on, for `--resume RUN` without --data (None if it recorded none)."""
    record = ckpt.read_meta(run_dir, stage).get("data")
    return None if record is None else find_recorded(record, run_dir, "its data", "--data")


# ---- fields a new run takes from what it reads ------------------------------------------------


def follow(args: argparse.Namespace, key: str, value: Any) -> Callable[[Any], Any]:
    """A `Run.start(derive=...)` step: a new run takes top-level field `key` = `value` from what it reads
    (the dataset's resolution, the autoencoder's), unless the command line set it with `--set key=...`
    (then the stage checks the two agree, or resizes on purpose) or `value` is None (unknown).

    value: the value, or a function of no arguments that reads it when the run is derived (after
    `Run.start` has checked the flags, so `lambda: read_info(args.data)["resolution"]` is safe).
    """

    def derive(cfg: Any) -> Any:
        found = value() if callable(value) else value
        if found is None or any(item.partition("=")[0].strip() == key for item in getattr(args, "set", [])):
            return cfg
        return dataclasses.replace(cfg, **{key: found})

    return derive
