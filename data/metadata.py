"""Captions from the metadata file of a diffusers / Hugging Face `imagefolder`: metadata.jsonl or metadata.csv.

The layout diffusers' training scripts read (`load_dataset("imagefolder", data_dir=...)`): a
`metadata.jsonl` with one JSON object per line, or a `metadata.csv` with a header row, each row
naming an image in "file_name" (a path relative to the metadata file's folder, "/"-separated) and
its caption in another column, "text" by default. A metadata file may sit in any folder of the
tree and speaks for the images under that folder.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from latentdiff.data.captions import BadCaption, decode_caption

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
FILE_COLUMN = "file_name"
DEFAULT_CAPTION_COLUMN = "text"
BAD_LINE = "unreadable metadata line"


@dataclass(frozen=True)
class Listed:
    """An image's caption as a metadata file gives it."""

    source: Path  # the metadata file
    line: int  # its line (jsonl) or row (csv; the header is row 1), from 1
    text: str  # the caption column's value, as written


def _rows(path: Path, text: str) -> tuple[Iterator[tuple[int, Any]], set[str]]:
    """(line number, row) of a metadata file, and the column names it uses."""
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = set(reader.fieldnames or [])
        return ((reader.line_num, row) for row in reader), columns
    rows, columns = [], set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            row = e  # reported with its line below
        rows.append((number, row))
        if isinstance(row, dict):
            columns |= set(row)
    return iter(rows), columns


def read_metadata(
    path: Path, caption_column: str = DEFAULT_CAPTION_COLUMN
) -> tuple[dict[Path, Listed], list[tuple[Path, str, str]]]:
    """({image path: Listed}, skipped [(file, reason, detail)]) of one metadata file.

    Image paths are `path.parent` joined with "file_name"; a name that leaves that folder (an
    absolute path, "..") is skipped, as is a row that is not an object with a string "file_name"
    and caption. Raises ValueError (one line, naming the columns found and the flag) when no row
    has "file_name" or the caption column.
    """
    try:
        text, _ = decode_caption(path.read_bytes())
    except (OSError, BadCaption) as e:
        return {}, [(path, "unreadable metadata file", str(e))]
    rows, columns = _rows(path, text)
    rows = list(rows)
    for column, hint in ((FILE_COLUMN, "each row names its image in it"), (caption_column, "pass --caption-column")):
        if rows and column not in columns:
            raise ValueError(
                f'{path} has no "{column}" column (it has: {", ".join(sorted(columns)) or "none"}); {hint}'
            )
    listed: dict[Path, Listed] = {}
    skipped: list[tuple[Path, str, str]] = []
    for number, row in rows:
        if isinstance(row, json.JSONDecodeError):
            skipped.append((path, BAD_LINE, f"line {number}: {row.msg}"))
            continue
        name = row.get(FILE_COLUMN) if isinstance(row, dict) else None
        caption = row.get(caption_column) if isinstance(row, dict) else None
        if not isinstance(name, str) or not isinstance(caption, str):
            skipped.append((path, BAD_LINE, f'line {number}: needs a string "{FILE_COLUMN}" and "{caption_column}"'))
            continue
        relative = PurePosixPath(name.strip())
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            skipped.append((path, BAD_LINE, f"line {number}: {name!r} is not a path inside {path.parent}"))
            continue
        image = path.parent.joinpath(*relative.parts)
        if image in listed:
            skipped.append((path, "image listed twice", f"line {number}: {name} (line {listed[image].line} is used)"))
            continue
        listed[image] = Listed(path, number, caption)
    return listed, skipped
