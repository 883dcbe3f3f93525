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

A run that reads another (a prior its autoencoder and text encoder, a decoder its autoencoder) pins
the checkpoint it read (core.checkpoint.pin): `load_run` does it for the run being trained, so the
source's pruning keeps that checkpoint, and `pinned_source` finds it again once the source has
trained on. `data_fingerprint` tells a resume and the latent cache whether the data changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
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
    where = _checkpoint_to_read(run_dir)
    meta = ckpt.read_meta(where, stage)
    missing = [k for k in needs if meta.get(k) is None]
    if missing:
        raise ckpt.CheckpointError(
            f"{run_dir} has no {missing[0]} in meta.json yet: its training did not finish; "
            f"resume it with `latentdiff train {stage} --resume {run_dir}`"
        )
    config = read_config(where, config_cls)
    model = build(config, meta)
    state = ckpt.load_weights(ckpt.committed_file(where, ckpt.EMA if ema and meta.get("ema") else ckpt.MODEL))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ckpt.CheckpointError(
            f"weights in {run_dir} do not fit its config.toml: {' '.join(line.strip() for line in first)}"
        ) from None
    model.to(device).eval().requires_grad_(False)
    return LoadedRun(run_dir.resolve(), meta, config, model, ckpt.tensors_hash(state))


# ---- runs that read other runs ----------------------------------------------------------------


@dataclass
class Reader:
    """The run being trained in this process: every run `load_run` reads meanwhile is one it depends on."""

    path: Path  # its run directory
    stage: str
    pin: bool  # write pins (the main rank; the other ranks read the same checkpoints)
    pinned: list[Path] = dataclasses.field(default_factory=list)  # source runs it pinned, for `restore_pins`
    # Each of those source runs' checkpoint this run had pinned before (None: none), for `restore_pins`.
    previous: dict[Path, Path | None] = dataclasses.field(default_factory=dict)


_reader: Reader | None = None


def reading_for(reader: Reader | None) -> None:
    """Set (or clear, with None) the run whose sources `load_run` pins (core.run_directory does, for a run's life)."""
    global _reader
    _reader = reader


def _checkpoint_to_read(path: Path) -> Path:
    """The run or checkpoint folder `load_run` reads from `path`; pinned for the run being trained, if any.

    The run's newest checkpoint, or the checkpoint folder given. Choosing and pinning happen under
    the source's pins lock (core.checkpoint.pin), so its pruning cannot remove the checkpoint in
    between. A source that cannot be written (read-only) is read unpinned, and one line says so.
    """
    if _reader is None or not _reader.pin or path.resolve() == _reader.path.resolve():
        return path
    chosen = ckpt.latest(path)
    if chosen is None or chosen.legacy:
        return path  # no checkpoint (read_meta says why) or a format-1 run, whose flat files have no folder to pin
    source = chosen.path.parent.parent
    if source not in _reader.previous:
        _reader.previous[source] = ckpt.pinned_checkpoint(source, _reader.path)
    try:
        ckpt.pin(chosen, _reader.path, _reader.stage)
    except ckpt.CheckpointError:
        chosen = ckpt.latest(path)  # pruned by a save that ran just before: the newest one now
        if chosen is not None and not chosen.legacy:
            ckpt.pin(chosen, _reader.path, _reader.stage)
    except OSError as e:
        print(
            f"latentdiff: cannot pin {chosen.path} for {_reader.path} ({e.strerror or e}): "
            f"if {path} trains on, its pruning may remove the checkpoint this run reads",
            file=sys.stderr,
        )
        return path
    if source not in _reader.pinned:
        _reader.pinned.append(source)
    return path if ckpt.is_checkpoint_folder(path) else _newest_or(path, chosen.path)


def _newest_or(run_dir: Path, folder: Path) -> Path:
    """`run_dir` while `folder` is its newest checkpoint (its root meta.json holds facts added since), else `folder`."""
    newest = ckpt.latest(run_dir)
    return run_dir if newest is not None and newest.path == folder else folder


def restore_pins(reader: Reader) -> None:
    """Put back the pins `reader` had before this process moved them: a run that ended without saving a
    checkpoint still reads what its last checkpoint read (a new run: nothing; a refused resume: its old pin)."""
    for source in reader.pinned:
        before = reader.previous.get(source)
        if before is None or not before.is_dir():
            ckpt.unpin(source, reader.path)
        else:
            ckpt.pin(ckpt.Checkpoint(before, ckpt.folder_order(before)[0]), reader.path, reader.stage)
    reader.pinned.clear()


def pinned_source(source: str | Path, dependent: str | Path) -> str:
    """The checkpoint of run `source` that run `dependent` was trained on, when `source` has trained on since;
    else `source` as given (so messages and records keep the run directory).

    A resumed prior (or generation from it) thus reads the autoencoder checkpoint it was trained with,
    kept by its pin, not the autoencoder's newest; one line says so.
    """
    folder = ckpt.pinned_checkpoint(source, dependent) if Path(source).is_dir() else None
    newest = ckpt.latest(source) if folder is not None else None
    if folder is None or newest is None or newest.path == folder:
        return str(source)
    if folder not in _said:  # once per process: a resume reads its flags back more than once
        _said.add(folder)
        print(
            f"latentdiff: {dependent} reads {folder}, the checkpoint it was trained with "
            f"({source} has saved {newest.path.name} since)",
            file=sys.stderr,
        )
    return str(folder)


_said: set[Path] = set()


# ---- the data a run trains on -----------------------------------------------------------------

DATASET_INFO = "info.json"  # a dataset's description, written by `latentdiff data` (data/shards.py)


@dataclass(frozen=True)
class DataFingerprint:
    """What tells a dataset from itself rebuilt or replaced, cheaply: its info.json's bytes and every
    shard's name, size and modification time (stat only; no shard is read, so it is instant on big data)."""

    sha256: str  # of all of the above
    shards: int  # tar files in the dataset's folder
    bytes: int  # their total size
    train: int | None  # training samples, from info.json's "splits" (None when it does not say)

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "shards": self.shards, "bytes": self.bytes}

    def describe(self) -> str:
        return f"{self.shards} shards, {self.bytes:,} bytes"


def data_fingerprint(data: str | Path) -> DataFingerprint | None:
    """The fingerprint of a dataset directory or local shard pattern (every shard in its folder, all splits).

    None for what is streamed (`pipe:`, URLs) or a folder that does not exist: nothing to compare.
    A copy made without keeping modification times (`cp -r`, not `cp -a`) fingerprints as changed.
    """
    text = str(data)
    if not is_local(text):
        return None
    path = Path(text).expanduser()
    folder = path if path.is_dir() else path.parent
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    info_file = folder / DATASET_INFO
    info = info_file.read_bytes() if info_file.is_file() else b""
    h.update(hashlib.sha256(info).digest())
    total, shards = 0, sorted(folder.glob("*.tar"))
    for shard in shards:
        st = shard.stat()
        total += st.st_size
        h.update(f"{shard.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    try:
        train = json.loads(info)["splits"]["train"] if info else None
    except (ValueError, KeyError, TypeError):
        train = None  # a damaged info.json: the data reader says so when it reads it
    return DataFingerprint(h.hexdigest()[:16], len(shards), total, int(train) if isinstance(train, int) else None)


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
