"""Who may use the page of `latentdiff serve`, and how much one visitor may take, without any web framework.

127.0.0.1 keeps other machines out, not the other accounts and programs of this one: a login
(Gradio's, a user name and password per person), a bound on the requests waiting in the queue,
and a bound on the size of an uploaded file make the page safe to leave running on a shared
machine. app.py hands these to Gradio (launch(auth=..., max_file_size=...), queue(max_size=...)).
"""

from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from latentdiff.core.errors import UserError

MAX_QUEUE = 20  # requests waiting at once, over every tab (a Runs refresh counts too); more are refused
MAX_UPLOAD = 20 * 2**20  # bytes per uploaded file (an init image or a mask): a large photo fits
UNITS = {"": 1, "b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30}  # Gradio's own: 1 KB = 1024 bytes
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?b?)\s*$", re.IGNORECASE)


def _check_users(users: tuple[tuple[str, str], ...]) -> None:
    seen = set()
    for user, password in users:
        # Gradio strips the name typed at its login form, so a name with spaces around it never matches.
        if not user or user != user.strip():
            raise UserError(f"a user name must be non-empty, without spaces around it, got {user!r}")
        if not password:
            raise UserError(f"the password of {user} is empty")
        if user in seen:
            raise UserError(f"user {user} is given twice; give each user one password")
        seen.add(user)


@dataclass(frozen=True)
class Access:
    """The login and the limits of one server; the defaults are those of `latentdiff serve`.

    Raises UserError for a bad value (one line, never quoting a password).
    """

    users: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # (user, password); empty: no login
    max_queue: int = MAX_QUEUE  # requests waiting at once over every tab; the next is refused ("queue is full")
    max_upload: int = MAX_UPLOAD  # bytes per uploaded file; a larger upload is refused (HTTP 413)

    def __post_init__(self):
        _check_users(self.users)
        for name, value, unit in (("max_queue", self.max_queue, ""), ("max_upload", self.max_upload, " of bytes")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a whole number{unit} >= 1, got {value!r}")

    @property
    def login(self) -> bool:
        return bool(self.users)

    @classmethod
    def from_flags(
        cls, auth: str | None, auth_file: str | None, max_queue: int = MAX_QUEUE, max_upload: str | None = None
    ) -> Access:
        """`latentdiff serve`'s --auth USER:PASSWORD or --auth-file FILE, --max-queue N and --max-upload SIZE."""
        users: tuple[tuple[str, str], ...] = ()
        if auth is not None:
            users = (credentials(auth, "--auth"),)
        elif auth_file is not None:
            users = read_auth_file(auth_file)
        size = MAX_UPLOAD if max_upload is None else parse_size(max_upload, "--max-upload")
        return cls(users, max_queue, size)


def credentials(text: str, where: str) -> tuple[str, str]:
    """'USER:PASSWORD' -> (user, password): split at the first colon, so a password may hold colons."""
    user, colon, password = text.partition(":")
    if not colon:
        raise UserError(f"{where} must be USER:PASSWORD (a user name, a colon, then the password)")
    try:
        _check_users(((user, password),))
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return user, password


def read_auth_file(path: str | Path) -> tuple[tuple[str, str], ...]:
    """The users of an --auth-file: one USER:PASSWORD a line (blank lines and lines starting with # skipped).

    The password is the rest of the line after the first colon, exactly (a Windows line end aside).
    The file must be closed to other accounts (no group or other permission bits, as ssh asks of a
    private key): the point of the login is to keep them out. Raises UserError, never quoting a password.
    """
    path = Path(path)
    where = f"--auth-file {path}"
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{where} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot read {where} ({e.strerror})") from None
    if os.name == "posix" and mode & 0o077:
        raise UserError(f"{where} can be read by other accounts (mode {mode:04o}); run chmod 600 {path}")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark from a Windows editor is not part of the first name
    except UnicodeDecodeError:
        raise UserError(f"{where} is not UTF-8 text") from None
    users = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if ":" not in line:
            raise UserError(f"{where}: line {number} is not USER:PASSWORD")
        users.append(credentials(line, f"{where} line {number}"))
    if not users:
        raise UserError(f"{where} holds no USER:PASSWORD line")
    _check_users(tuple(users))
    return tuple(users)


def parse_size(text: str, where: str) -> int:
    """'20MB', '512KB', '1GB', '2.5MB' or a number of bytes -> bytes (1 KB = 1024 bytes, as Gradio counts)."""
    match = SIZE.match(text)
    size = float(match[1]) * UNITS[match[2].lower()] if match else math.nan
    if not (math.isfinite(size) and size >= 1):
        raise UserError(f"{where} must be a size such as 20MB, 512KB or 1GB (1 KB = 1024 bytes), got {text!r}")
    return int(size)
