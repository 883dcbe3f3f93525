"""Output folders that never mix two results: a command that writes one refuses a folder that holds another."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .errors import UserError


def fresh_output_dir(path: str | Path, overwrite: bool, *, ours: Iterable[str] = ()) -> Path:
    """Create `path`, or check it is empty; with `overwrite`, first delete the files named by `ours`.

    ours: glob patterns (relative to `path`) of what the command itself writes, e.g. "*.tar" and
    "info.json" for a dataset: only those are deleted, never a user's other files. Raises
    UserError (one line, naming the folder and the flag) when the folder still holds anything.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file, not a folder")
    if overwrite and path.is_dir():
        for pattern in ours:
            for old in path.glob(pattern):
                if old.is_file():
                    old.unlink()
    if path.is_dir():
        left = sorted(p.name for p in path.iterdir())
        if left:
            shown = ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
            hint = "pass --overwrite to replace what this command wrote there, or " if ours else ""
            raise UserError(f"--out {path} is not empty ({shown}); {hint}choose a new folder")
    path.mkdir(parents=True, exist_ok=True)
    return path
