"""Turning bad input into one line a person can act on, instead of a deep traceback."""

from __future__ import annotations

import contextlib
import os
import sys


class UserError(ValueError):
    """Bad input from the user: a missing file, a wrong run directory, an impossible option."""


@contextlib.contextmanager
def cli_errors(prog: str = "latentdiff"):
    """Print expected errors as `latentdiff: error: ...` and exit 2 (LATENTDIFF_DEBUG=1 re-raises)."""
    try:
        yield
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if os.environ.get("LATENTDIFF_DEBUG"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; the last checkpoint is kept (resume with --resume RUN)", file=sys.stderr)
        raise SystemExit(130) from None
