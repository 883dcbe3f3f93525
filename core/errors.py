"""Turning bad input into one line a person can act on, instead of a deep traceback."""

from __future__ import annotations

import contextlib
import os
import sys


class UserError(ValueError):
    """Bad input from the user: a missing file, a wrong run directory, an impossible option."""


class Stopped(Exception):
    """SIGTERM or SIGINT ended a run after a checkpoint; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


@contextlib.contextmanager
def cli_errors(prog: str = "latentdiff"):
    """Print expected errors as `latentdiff: error: ...` and exit 2 (LATENTDIFF_DEBUG=1 re-raises)."""
    try:
        yield
    except Stopped as e:  # SIGTERM/SIGINT: a checkpoint was saved; exit as the signal would have
        print(f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if os.environ.get("LATENTDIFF_DEBUG"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; the last checkpoint is kept (resume with --resume RUN)", file=sys.stderr)
        raise SystemExit(130) from None
