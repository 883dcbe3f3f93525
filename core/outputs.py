"""Output folders that never mix two results and never lose one (`latentdiff data`, `latentdiff generate`).

A command that writes a folder of results goes through `OutputFolder`:

1. Before any work the folder is checked: it must be new, empty, or (with --overwrite) hold only
   what an earlier run of the same command lists in its record (a JSON file such as info.json or
   settings.json whose "files" names what it wrote). Any other file is refused by name, before
   anything is read or written: it is never deleted, and never mixed into the new result (the
   dataset reader would read a foreign `train-*.tar`; a person would take a foreign PNG for a
   generated one).
2. The command writes into a staging folder inside it, `.partial-PID-XXXX` (same filesystem, so
   the swap is renames; hidden, so no reader picks it up).
3. When the command is done, the staged files are fsynced and moved in, one rename each, the
   record last; only then are the earlier files that the new record does not list deleted. A
   command that fails or is interrupted removes its staging folder: the earlier output is
   untouched. One stopped during the moves themselves (milliseconds) keeps its staging folder
   with its record, whose files then count as the command's for the next --overwrite.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from .checkpoint import CheckpointError, fsync_dir, read_json
from .errors import UserError

STAGING_PREFIX = ".partial-"
LISTED_KEY = "files"  # the record's list of the files the command wrote


def _shown(names: Iterable[str], first: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:first]) + (f" and {len(names) - first} more" if len(names) > first else "")


def _is_staging(path: Path) -> bool:
    return path.name.startswith(STAGING_PREFIX) and path.is_dir() and not path.is_symlink()


def _owner_gone(staging: Path) -> bool:
    """Whether the process that made a staging folder has ended (its pid is in the name)."""
    pid = staging.name[len(STAGING_PREFIX) :].split("-", 1)[0]
    if not pid.isdigit():
        return False  # not named by us: leave it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by another user
        return False
    return False


def listed_files(record: Any) -> set[str]:
    """The names a record's "files" lists that can only mean a file directly in the folder (no path parts)."""
    listed = record.get(LISTED_KEY) if isinstance(record, dict) else None
    if not isinstance(listed, list):
        return set()
    plain = (n for n in listed if isinstance(n, str) and n not in ("", ".", ".."))
    return {n for n in plain if Path(n).name == n and "\\" not in n}


class OutputFolder:
    """`path` checked now; written through `staging` inside a `with` block; swapped in when the block ends.

    record: the file name of the command's record (info.json, settings.json), a JSON object whose
    "files" lists what it wrote; the command writes it into `staging` like its other files.
    also: names the command always writes beside its record (generate's grid.png).
    Raises UserError (one line, naming the folder, the files in the way and what to do) when the
    folder is a file, or is not empty and `overwrite` is off, or holds anything its record does not list.
    """

    def __init__(
        self, path: str | Path, overwrite: bool, *, record: str, also: Iterable[str] = (), flag: str = "--out"
    ):
        self.path = Path(path)
        self.record = record
        self.also = frozenset(also)
        self.flag = flag
        self.previous = self._check(overwrite)  # the earlier output's files, replaced at the commit
        self.staging: Path | None = None
        self._created = False
        self._moving = False  # from the first rename into the folder on

    def _entries(self) -> list[Path]:
        """What the folder holds, but staging folders (a running command's, or a killed one's)."""
        return sorted(p for p in self.path.iterdir() if not _is_staging(p))

    def _check(self, overwrite: bool) -> frozenset[str]:
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.flag} {self.path} is a file, not a folder")
        entries = self._entries() if self.path.is_dir() else []
        names = [p.name for p in entries]
        if not names:
            return frozenset()
        ours = self._ours(names)
        foreign = [p.name for p in entries if p.name not in ours or p.is_symlink() or not p.is_file()]
        if not overwrite and not foreign:
            raise UserError(
                f"{self.flag} {self.path} is not empty ({_shown(names)}); pass --overwrite to replace what this "
                "command wrote there, or choose a new folder"
            )
        if not overwrite:  # --overwrite would not help: say what would
            them = "it" if len(foreign) == 1 else "them"
            raise UserError(
                f"{self.flag} {self.path} is not empty: it holds {_shown(foreign)}, which no {self.record} there "
                f"lists as written by this command; move {them} away, or choose a new folder"
            )
        if foreign:
            them = "it" if len(foreign) == 1 else "them"
            raise UserError(
                f"{self.flag} {self.path} holds {_shown(foreign)}, which its {self.record} does not list as written "
                f"by this command; --overwrite replaces only that: move {them} away, or choose a new folder"
            )
        return frozenset(names)

    def _ours(self, names: list[str]) -> set[str]:
        """The names the earlier output's record lists, the record itself and `also`.

        A record left in a staging folder (its command was stopped while moving its files in)
        counts too: the files it had moved are its own.
        """
        left = set()
        for staging in (p for p in self.path.iterdir() if _is_staging(p) and (p / self.record).is_file()):
            try:
                left |= listed_files(read_json(staging / self.record))
            except CheckpointError:
                continue
        ours = left | {self.record} | set(self.also)
        path = self.path / self.record
        if not path.is_file() and left:
            return ours
        if not path.is_file():
            them = "it" if len(names) == 1 else "them"
            raise UserError(
                f"{self.flag} {self.path} holds {_shown(names)} and no {self.record}, so nothing there was written "
                f"by this command (--overwrite replaces only that): move {them} away, or choose a new folder"
            )
        try:
            record = read_json(path)
        except CheckpointError as e:
            raise UserError(f"{e}; --overwrite replaces only the files it lists: choose a new folder") from None
        if not isinstance(record, dict) or not isinstance(record.get(LISTED_KEY), list):
            raise UserError(
                f"{path} does not list the files written with it (an older latentdiff, or another program wrote it); "
                "--overwrite replaces only listed files: move the folder's contents away, or choose a new folder"
            )
        return listed_files(record) | ours

    def __enter__(self) -> OutputFolder:
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=self.path))
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None):
        if kind is not None:
            self.abandon()
            return False
        try:
            self.commit()
        except _Changed:
            raise  # the staged output is kept, and the message says where
        except BaseException:
            if not self._moving:  # else the staging folder keeps the rest and the record (see _ours)
                self.abandon()
            raise
        return False

    def commit(self) -> None:
        """Move the staged files in (the record last), then delete the earlier files the new record does not list."""
        assert self.staging is not None, "commit() outside the with block"
        staged = sorted(p for p in self.staging.iterdir())
        names = {p.name for p in staged}
        if self.record not in names:
            raise RuntimeError(f"the command wrote no {self.record} into {self.staging}")
        unlisted = names - listed_files(read_json(self.staging / self.record)) - {self.record} - self.also
        if unlisted:  # a later --overwrite would refuse them as foreign
            raise RuntimeError(f"{self.record} does not list {_shown(unlisted)}, which the command wrote")
        # The folder must still hold what was checked before the work: a file that appeared since
        # (another command writing here, a person) is neither replaced nor deleted.
        appeared = {p.name for p in self._entries()} - self.previous
        if appeared:
            raise _Changed(
                f"{self.flag} {self.path} changed while this command ran ({_shown(appeared)} appeared); the new "
                f"output is kept in {self.staging}: move it where you want it"
            )
        for path in staged:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(self.staging)
        self._moving = True
        for path in sorted(staged, key=lambda p: p.name == self.record):  # the record last
            os.replace(path, self.path / path.name)
        fsync_dir(self.path)
        for name in sorted(self.previous - names):
            (self.path / name).unlink(missing_ok=True)
        self.staging.rmdir()
        for leftover in self.path.iterdir():  # staging folders of commands that were killed
            if _is_staging(leftover) and _owner_gone(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
        fsync_dir(self.path)

    def abandon(self) -> None:
        """Remove the staging folder (and the output folder when this command made it and it is empty)."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        if self._created:
            try:
                self.path.rmdir()
            except OSError:
                pass  # not empty: someone else's files


class _Changed(UserError):
    """The output folder changed while the command ran; its staged output is kept."""
