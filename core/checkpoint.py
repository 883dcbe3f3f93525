"""Run-directory checkpoints: each one a unit of files committed by one atomic step.

A run directory of any stage holds

    config.toml, meta.json   copies for people (and for a run that has no checkpoint yet)
    summary.json, metrics.jsonl, *.png
    checkpoints/
        step-000000500/      one committed checkpoint:
            manifest.json        {"format_version", "step", "files": {name: {"bytes", "sha256"}}}
            config.toml          the resolved stage config (what rebuilds the model)
            meta.json            {"stage", "format_version", "step", ...stage facts such as the latent scale}
            model.safetensors    the trained weights (and e.g. disc.safetensors for other modules)
            ema.safetensors      the EMA weights, when the stage keeps them
            state.pt             optimizer, step, RNG states: what `--resume` needs, nothing else
            rng_rank1.pt ...     under torchrun, every other rank's RNG state
        step-000001000/
        .staging-000001500/  a save in progress (removed at the next start if it was interrupted)
    pins/                    runs that read one of these checkpoints (a prior reads its autoencoder's):
        lock                     taken to write a pin and to prune, so neither misses the other
        <key>.json               {"dependent", "source", "checkpoint", "stage", "since"}: pruning keeps that checkpoint

Why step folders with a manifest inside, renamed into place, and no `latest` pointer: keeping
the last K checkpoints needs several versions of each file side by side, which flat files
cannot hold; a folder is written under a hidden staging name, every file and the folder are
fsynced, and one rename of the folder commits it, so a reader never sees a half-written
checkpoint under a `step-` name. The manifest (sizes and sha256 of every file) is what a
reader verifies: it catches what a rename cannot promise (a torn copy on a filesystem whose
directory rename is not atomic, bit rot, a file edited by hand), and then the previous
complete checkpoint is used and the reader says so in one line. The newest checkpoint is the
highest step that verifies; a `latest` pointer would be a second record that can disagree.
Saving a step that is already committed (the final save after the last periodic one) goes
to `step-N.1`, `.2`, ...: a commit never has to remove the checkpoint it supersedes first.

A checkpoint folder (`RUN/checkpoints/step-N`) is also a reference to its run at that step:
`read_meta`, `committed_file` and so every loader read it, verified, in place of the newest.
A run that others read (an autoencoder under a prior) keeps the checkpoint each of them was
trained on: they pin it (`pin`), pruning skips pinned folders, and a pin lapses when its
dependent run is deleted.

Format 1 (latentdiff before checkpoints/) kept flat files in the run directory; they still
load, and the first checkpoint a resumed format-1 run writes replaces them.

Loading never unpickles code: weights come from safetensors and the training state through
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .faults import LOCK, RunLock

FORMAT_VERSION = 2
META = "meta.json"
CONFIG = "config.toml"
MODEL = "model.safetensors"
EMA = "ema.safetensors"
STATE = "state.pt"
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
PINS = "pins"  # RUN/pins/: the runs that read one of RUN's checkpoints, so pruning keeps it
READABLE = (META, CONFIG)  # kept at the run root too, for people
_STEP_DIR = re.compile(r"^step-(\d+)(?:\.(\d+))?$")
_TMP_SUFFIX = ".tmp"


class CheckpointError(ValueError):
    """A run directory that is missing, incomplete or of another stage."""


class NewerFormatError(CheckpointError):
    """A checkpoint written by a newer latentdiff: not corrupt, so never skipped or set aside."""


# ---- single files -------------------------------------------------------------------------


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (new names, renames) durable; a no-op where directories cannot be opened."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, fsync, then rename the temporary file onto `path` (same directory).

    The temporary name is `.NAME.XXXX.tmp`; `remove_leftovers` deletes those an interrupted write left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    # Clone so tied parameters become separate tensors, which safetensors requires.
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state_dict.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_weights(path: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; CheckpointError naming the file when it is missing or damaged."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); it is truncated or damaged: "
            "restore it, or resume from an earlier checkpoint"
        ) from None


def read_json(path: str | Path) -> Any:
    """A JSON file a run or dataset records; CheckpointError naming the file when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path} is not valid JSON ({e}); it was damaged or edited by hand: restore it from a copy"
        ) from None


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hash(path: str | Path, length: int = 16) -> str:
    """Content hash (sha256, shortened) of a file: how runs recognise each other's weights."""
    return sha256(path)[:length]


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


# ---- checkpoints as units -----------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """One committed checkpoint: its folder, step and verified files (format 1: the run directory, unverified)."""

    path: Path
    step: int
    files: dict[str, dict] = field(default_factory=dict)  # name -> {"bytes": int, "sha256": str}
    legacy: bool = False

    def file(self, name: str) -> Path:
        return self.path / name


def _order(folder: Path) -> tuple[int, int] | None:
    m = _STEP_DIR.match(folder.name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def folder_order(folder: Path) -> tuple[int, int]:
    """(step, seq) of a checkpoint folder `step-N` or `step-N.seq`: the order in which they were committed."""
    order = _order(folder)
    if order is None:
        raise CheckpointError(f"{folder} is not a checkpoint folder (step-N)")
    return order


def step_folder(run_dir: str | Path, step: int, seq: int = 0) -> Path:
    return Path(run_dir) / CHECKPOINTS / (f"step-{step:09d}" + (f".{seq}" if seq else ""))


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """The committed-looking folders of a run (`checkpoints/step-*`), newest first; nothing verified."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _order(p)), key=_order, reverse=True)


def staging_dir(run_dir: str | Path, step: int) -> Path:
    """Where every rank writes the files of the checkpoint of `step` before `commit` (created here)."""
    path = Path(run_dir) / CHECKPOINTS / f".staging-{step:09d}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def commit(run_dir: str | Path, staging: Path, step: int, keep: int) -> Path:
    """Seal `staging` as the checkpoint of `step`: manifest, fsync, one rename; then keep the newest `keep`.

    Raises CheckpointError for keep < 1. Main rank only, after every rank has written its files.
    """
    if keep < 1:
        raise CheckpointError(f"train.keep_checkpoints must be at least 1, got {keep}")
    run_dir, root = Path(run_dir), Path(run_dir) / CHECKPOINTS
    names = sorted(
        p.name for p in staging.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.endswith(_TMP_SUFFIX)
    )
    files = {n: {"bytes": (staging / n).stat().st_size, "sha256": sha256(staging / n)} for n in names}
    write_json(staging / MANIFEST, {"format_version": FORMAT_VERSION, "step": step, "files": files})
    fsync_dir(staging)
    seqs = [folder_order(f)[1] for f in checkpoint_dirs(run_dir) if folder_order(f)[0] == step]
    target = step_folder(run_dir, step, max(seqs) + 1 if seqs else 0)
    os.replace(staging, target)  # the commit
    fsync_dir(root)
    # The hashes were just computed from these files: the next read need not hash them again.
    _verified[target] = (_signature(target, files), Checkpoint(target, step, files))
    _prune(run_dir, keep)
    for name in names:  # a resumed format-1 run: its flat copies are now stale
        if name not in READABLE:
            (run_dir / name).unlink(missing_ok=True)
    return target


def _prune(run_dir: Path, keep: int) -> None:
    """Remove all but the newest `keep` steps (and older copies of a step saved twice); pinned ones stay.

    Under the pins lock: a run pinning one of these checkpoints either pinned it first (it stays)
    or finds it gone and reads the newest (see `pin`).
    """
    with _pins_lock(run_dir):
        pinned = {p.checkpoint for p in pins(run_dir, tidy=True)}
        seen: list[int] = []
        for folder in checkpoint_dirs(run_dir):
            step = _order(folder)[0]
            if step in seen or len(seen) >= keep:
                if folder.name in pinned:
                    continue  # another run was trained on it
                doomed = folder.with_name(f".pruning-{folder.name}")
                os.replace(folder, doomed)  # out of the step- names first, so a crash here leaves no half folder
                shutil.rmtree(doomed, ignore_errors=True)
            else:
                seen.append(step)


def set_aside(run_dir: str | Path, folder: Path) -> Path:
    """Rename a checkpoint folder that failed verification to `rejected-step-...`: kept for a person, never read."""
    n = 0
    while (target := folder.with_name(f"rejected-{folder.name}" + (f"-{n}" if n else ""))).exists():
        n += 1
    os.replace(folder, target)
    fsync_dir(folder.parent)
    return target


def remove_leftovers(run_dir: str | Path) -> list[Path]:
    """Delete what an interrupted save left (staging folders, `.*.tmp` files); returns what was removed.

    Call only while holding the run (one writer), before the first save.
    """
    run_dir = Path(run_dir)
    removed = []
    for where in (run_dir, run_dir / CHECKPOINTS):
        if not where.is_dir():
            continue
        for p in where.iterdir():
            if p.is_dir() and p.name.startswith((".staging-", ".pruning-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
            elif p.is_file() and p.name.startswith(".") and p.name.endswith(_TMP_SUFFIX):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


_verified: dict[Path, tuple[Any, Checkpoint]] = {}  # folder -> (stat signature, checkpoint): hash each file once


def _signature(folder: Path, files: dict[str, dict]) -> tuple:
    """What must not change for a verified folder to stay verified; raises CheckpointError on a missing file or size."""
    signature = []
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder.name}/{name} is missing")
        st = path.stat()
        if st.st_size != want["bytes"]:
            raise CheckpointError(f"{folder.name}/{name} has {st.st_size} bytes, the manifest says {want['bytes']}")
        signature.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
    return (folder / MANIFEST).stat().st_mtime_ns, tuple(signature)


def verify(folder: str | Path) -> Checkpoint:
    """The checkpoint in `folder` after checking its manifest, sizes and sha256 hashes; CheckpointError if not."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    try:
        manifest = read_json(manifest_path)
        files = dict(manifest["files"])
        step = int(manifest["step"])
        version = int(manifest["format_version"])
    except FileNotFoundError:
        raise CheckpointError(f"{folder.name} has no {MANIFEST}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder.name}/{MANIFEST} is unreadable ({e})") from None
    if version > FORMAT_VERSION:
        raise NewerFormatError(
            f"{folder} was written by a newer latentdiff (format {version} > {FORMAT_VERSION}); upgrade latentdiff"
        )
    signature = _signature(folder, files)
    cached = _verified.get(folder)
    if cached is not None and cached[0] == signature:
        return cached[1]
    for name, want in files.items():
        if sha256(folder / name) != want["sha256"]:
            raise CheckpointError(f"{folder.name}/{name} does not match its sha256 in the manifest")
    checkpoint = Checkpoint(folder, step, files)
    _verified[folder] = (signature, checkpoint)
    return checkpoint


def latest(run_dir: str | Path, rejected: list[tuple[Path, str]] | None = None) -> Checkpoint | None:
    """The newest checkpoint of a run that verifies; None when the run has none yet.

    Folders that fail verification are appended to `rejected` as (folder, reason) and skipped.
    A run without checkpoints/ but with flat format-1 files gives a legacy Checkpoint of the run
    directory; a checkpoint folder (`RUN/checkpoints/step-N`) gives itself, verified. Raises
    CheckpointError when checkpoints exist and none verifies.
    """
    run_dir = Path(run_dir)
    if is_checkpoint_folder(run_dir):
        return verify(run_dir)
    folders = checkpoint_dirs(run_dir)
    reasons = []
    for folder in folders:
        try:
            return verify(folder)
        except NewerFormatError:
            raise
        except CheckpointError as e:
            reasons.append((folder, str(e)))
            if rejected is not None:
                rejected.append((folder, str(e)))
    if folders:
        raise CheckpointError(f"no complete checkpoint in {run_dir}: " + "; ".join(r for _, r in reasons))
    if (run_dir / STATE).is_file() or (run_dir / MODEL).is_file():  # format 1: flat files
        meta = read_json(run_dir / META) if (run_dir / META).is_file() else {}
        return Checkpoint(run_dir, int(meta.get("step", 0)), legacy=True)
    return None


_warned: set[Path] = set()


def fallback_message(run_dir: Path, chosen: Checkpoint, rejected: list[tuple[Path, str]], action: str = "") -> str:
    """The one line that says the newest checkpoint(s) were skipped and which one is used."""
    skipped = "; ".join(f"{folder.relative_to(run_dir)} ({reason})" for folder, reason in rejected)
    return (
        f"latentdiff: newest checkpoint incomplete or corrupt, using step {chosen.step} "
        f"({chosen.path.relative_to(run_dir) if not chosen.legacy else run_dir}) instead: {skipped}{action}"
    )


def committed_file(run_dir: str | Path, name: str) -> Path:
    """Path of file `name` (e.g. MODEL, EMA, STATE, CONFIG, META) in the newest complete checkpoint of `run_dir`.

    Every reader of a run's checkpoint files goes through here, so the on-disk layout of a
    checkpoint is known in this module alone. A run with no checkpoint yet (or a format-1 run)
    gives the file in the run directory. When the newest checkpoint fails verification the
    previous one is used and one line on stderr says so. Raises CheckpointError when the run's
    checkpoints all fail.
    """
    run_dir = Path(run_dir)
    rejected: list[tuple[Path, str]] = []
    chosen = latest(run_dir, rejected)
    if chosen is None:
        return run_dir / name
    new = [r for r in rejected if r[0] not in _warned]
    if new:
        _warned.update(folder for folder, _ in new)
        print(fallback_message(run_dir, chosen, new), file=sys.stderr)
    return chosen.file(name)


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether a run directory holds any checkpoint (committed folders or format-1 files), verified or not."""
    run_dir = Path(run_dir)
    return bool(checkpoint_dirs(run_dir)) or (run_dir / STATE).is_file() or (run_dir / MODEL).is_file()


def is_checkpoint_folder(path: str | Path) -> bool:
    """Whether `path` is one committed checkpoint folder, `RUN/checkpoints/step-N` (a run at that step)."""
    path = Path(path)
    return path.parent.name == CHECKPOINTS and _order(path) is not None and (path / MANIFEST).is_file()


def lock_holder(run_dir: str | Path) -> str | None:
    """Who is training `run_dir` now ("pid N on HOST (since ...)"), or None when no process holds its lock.

    Probes the lock (core.faults.RunLock) without waiting; a lock file that cannot be opened
    (a read-only run) says nothing.
    """
    lock_file = Path(run_dir) / LOCK
    if not lock_file.is_file():
        return None
    probe = FileLock(str(lock_file))
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return RunLock(Path(run_dir)).holder()
    except OSError:
        return None
    probe.release()
    return None


def read_meta(run_dir: str | Path, stage: str | None = None) -> dict[str, Any]:
    """A run's meta: its newest complete checkpoint's meta.json over the root copy; checks `stage` if given.

    The root meta.json may hold facts added after the last save (a classifier's accuracies),
    so it is read too, but every key the checkpoint has comes from the checkpoint.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    root = run_dir / META
    committed = committed_file(run_dir, META)
    if not root.is_file() and not committed.is_file() and (run_dir / CONFIG).is_file():
        holder = lock_holder(run_dir)
        if holder is not None:
            raise CheckpointError(
                f"{run_dir} has no checkpoint yet: it is in use by {holder}, which is training it and "
                "has not saved yet; wait for its first checkpoint (train.ckpt_every) or for it to end"
            )
        raise CheckpointError(
            f"{run_dir} has no checkpoint yet: its run stopped before the first save; "
            f"start it again with --out {run_dir}"
        )
    if not root.is_file() and not committed.is_file():
        raise CheckpointError(
            f"{run_dir} is not a latentdiff run directory (no {META}); "
            "train one with `latentdiff train STAGE --out DIR`"
        )
    meta = read_json(root) if root.is_file() else {}
    if committed != root and committed.is_file():
        meta.update(read_json(committed))
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{run_dir} was written by a newer latentdiff "
            f"(format {meta['format_version']} > {FORMAT_VERSION}); upgrade latentdiff"
        )
    if stage is not None and meta.get("stage") != stage:
        raise CheckpointError(
            f"{run_dir} is a {meta.get('stage')!r} run, not a {stage!r} run; "
            f"pass the output directory of `latentdiff train {stage}`"
        )
    return meta


def amend(
    run_dir: str | Path,
    weights: dict[str, dict[str, torch.Tensor]] | None = None,
    meta: dict | None = None,
    config_toml: str | None = None,
) -> Path:
    """Commit a new checkpoint of a run's newest step with some weights files replaced and/or meta updated.

    weights: {file name: state dict}; meta: keys to set in meta.json; config_toml: a new config.toml (e.g.
    sampling defaults chosen by an evaluation; the caller keeps it loadable). Every other file is copied
    from the newest checkpoint, which the new one replaces; older steps are kept. For
    hand-edited weights (a converted or patched model) and for facts measured after training.
    Returns the new checkpoint folder.
    """
    run_dir = Path(run_dir)
    keep = max(1, len({folder_order(f)[0] for f in checkpoint_dirs(run_dir)}))
    current = latest(run_dir)
    full_meta = read_meta(run_dir)
    staging = staging_dir(run_dir, current.step if current else 0)
    if current is not None:
        names = (
            list(current.files)
            if not current.legacy
            else [p.name for p in current.path.iterdir() if p.is_file() and _is_legacy_checkpoint_file(p.name)]
        )
        for name in names:
            if name not in (weights or {}) and not (name == CONFIG and config_toml is not None):
                shutil.copy2(current.file(name), staging / name)
    for name, state in (weights or {}).items():
        save_weights(staging / name, state)
    if config_toml is not None:
        write_text(staging / CONFIG, config_toml)
    full_meta.update(meta or {})
    full_meta["format_version"] = FORMAT_VERSION
    write_json(staging / META, full_meta)
    target = commit(run_dir, staging, int(full_meta.get("step", current.step if current else 0)), keep)
    write_json(run_dir / META, full_meta)
    if config_toml is not None:
        write_text(run_dir / CONFIG, config_toml)
    return target


def _is_legacy_checkpoint_file(name: str) -> bool:
    return name in (CONFIG, STATE) or name.endswith(".safetensors") or re.match(r"^rng_rank\d+\.pt$", name) is not None


# ---- pins: the checkpoints other runs read ------------------------------------------------


@dataclass(frozen=True)
class Pin:
    """One run reading one checkpoint of another (a prior its autoencoder's): that checkpoint is never pruned."""

    dependent: Path  # the run that reads it, resolved
    checkpoint: str  # the folder name under checkpoints/ (step-N or step-N.seq)
    stage: str  # the dependent's stage, for messages
    file: Path  # the pin's own file, RUN/pins/KEY.json


def _pins_lock(run_dir: Path) -> FileLock:
    """The lock every pin and every pruning of `run_dir` takes (RUN/pins/lock; filelock, released by the OS)."""
    (run_dir / PINS).mkdir(parents=True, exist_ok=True)
    return FileLock(str(run_dir / PINS / "lock"), timeout=120)


def _pin_key(dependent: Path) -> str:
    return hashlib.sha256(str(dependent.resolve()).encode()).hexdigest()[:16]


def pins(run_dir: str | Path, tidy: bool = False) -> list[Pin]:
    """The pins on `run_dir`'s checkpoints whose dependent run still exists (at its recorded path or the same
    place relative to this run) and that were written for this run (here, or moved with its dependent: a
    copy of a run does not inherit them); the others have lapsed. tidy: delete the lapsed ones' files
    (only under the pins lock, as `_prune` does)."""
    run_dir = Path(run_dir)
    folder = run_dir / PINS
    if not folder.is_dir():
        return []
    live, here = [], run_dir.resolve()
    for file in sorted(folder.glob("*.json")):
        try:
            record = read_json(file)
            where = [Path(record["dependent"]["path"]), run_dir / record["dependent"]["from_run"]]
            found = next((p.resolve() for p in where if p.is_dir()), None)
            source = record["source"]
            # Written for this run (moved with its dependent, or not): a copy of the run does not inherit its pins.
            ours = found is not None and here in (Path(source["path"]), (found / source["from_dependent"]).resolve())
            pin = Pin(found, str(record["checkpoint"]), str(record["stage"]), file) if ours else None
        except (CheckpointError, FileNotFoundError, KeyError, TypeError):
            continue  # unreadable: written by hand or torn; it pins nothing
        if pin is not None:
            live.append(pin)
        elif tidy:
            file.unlink(missing_ok=True)
    return live


def pin(checkpoint: Checkpoint, dependent: str | Path, stage: str) -> Path:
    """Record that run `dependent` reads `checkpoint` (a committed folder), so its run never prunes it.

    One pin per dependent and source run: pinning another checkpoint of the same run moves it.
    Under the pins lock, so the checkpoint cannot be pruned between the check here and the pin.
    Returns the pin's file. Raises CheckpointError when the checkpoint was pruned before it could
    be pinned (read the run again), OSError when the source run cannot be written (a read-only copy).
    """
    run_dir = checkpoint.path.parent.parent
    dependent = Path(dependent).resolve()
    with _pins_lock(run_dir):
        if not checkpoint.path.is_dir():
            raise CheckpointError(f"{checkpoint.path} was pruned while {dependent} was reading it; start again")
        file = run_dir / PINS / f"{_pin_key(dependent)}.json"
        source = run_dir.resolve()
        where = {"path": str(dependent), "from_run": os.path.relpath(dependent, source)}
        back = {"path": str(source), "from_dependent": os.path.relpath(source, dependent)}
        record = {"dependent": where, "source": back, "checkpoint": checkpoint.path.name, "stage": stage}
        write_json(file, {**record, "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    return file


def unpin(run_dir: str | Path, dependent: str | Path) -> None:
    """Drop `dependent`'s pin on `run_dir` (a run that failed before its first checkpoint depends on nothing)."""
    run_dir, dependent = Path(run_dir), Path(dependent).resolve()
    if not (run_dir / PINS).is_dir():
        return
    with _pins_lock(run_dir):
        (run_dir / PINS / f"{_pin_key(dependent)}.json").unlink(missing_ok=True)


def pinned_checkpoint(run_dir: str | Path, dependent: str | Path) -> Path | None:
    """The checkpoint folder of `run_dir` that `dependent` pinned, when it still exists; else None."""
    dependent = Path(dependent).resolve()
    for p in pins(run_dir):
        folder = Path(run_dir) / CHECKPOINTS / p.checkpoint
        if p.dependent == dependent and folder.is_dir():
            return folder
    return None


# ---- training state -----------------------------------------------------------------------


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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        from .safe_load import refusal_reason  # one line of torch's many; safe_load imports this module

        raise CheckpointError(
            f"{path} is not a readable training state ({refusal_reason(e)}); "
            "it is truncated or damaged: resume from an earlier checkpoint"
        ) from None
    if "rng" in state:
        state["rng"]["numpy"] = _numpy_state_from_tensors(state["rng"]["numpy"])
    return state


def write_first_checkpoint(
    run_dir: str | Path, stage: str, config_toml: str, state: dict[str, torch.Tensor], meta: dict
) -> None:
    """A run that did not come from training (an imported one): one committed step-0 checkpoint (config.toml,
    model.safetensors, meta.json) and the root copies people read. A failed write leaves no checkpoint."""
    run_dir = Path(run_dir)
    meta = {"stage": stage, "format_version": FORMAT_VERSION, "step": 0, "ema": False, **meta}
    staging = staging_dir(run_dir, 0)
    try:
        write_text(staging / CONFIG, config_toml)
        save_weights(staging / MODEL, state, {"step": 0})
        write_json(staging / META, meta)
        commit(run_dir, staging, 0, keep=1)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_text(run_dir / CONFIG, config_toml)
    write_json(run_dir / META, meta)
