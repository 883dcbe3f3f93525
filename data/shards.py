"""Writing a dataset directory of webdataset tar shards.

Layout of a dataset directory DIR (what `latentdiff data ...` writes and `reader` reads):

    DIR/train-000000.tar, DIR/train-000001.tar, ..., DIR/val-000000.tar, ..., DIR/test-000000.tar
    DIR/info.json   {"source", "resolution", "splits": {"train": N, ...}, source-specific keys,
                     "files": the shards, by name}

"files" is the dataset's record of what it wrote: `latentdiff data --overwrite` replaces those
files and nothing else (core/outputs.py).

Each sample in a shard is `{key}.png` (RGB), `{key}.txt` (utf-8 caption) and `{key}.json`
(label, attributes, source) -- the layout img2dataset writes for LAION.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from latentdiff.data.images import png_bytes

SPLITS = ("train", "val", "test")
DEFAULT_MAXCOUNT = 5000
INFO_FILE = "info.json"
# webdataset splits a member name at its first dot into key and extension, so keys have none.
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass(frozen=True)
class Sample:
    """One (image, caption) pair on its way into a shard."""

    key: str  # unique within the dataset; letters, digits, "_" and "-" only
    image: Image.Image | bytes  # an RGB image, or already-encoded file bytes stored as-is
    caption: str  # utf-8 text, stored as {key}.txt
    meta: dict[str, Any] = field(default_factory=dict)  # stored as {key}.json
    image_ext: str = "png"  # extension of the image member; used when `image` is bytes


def shard_pattern(out_dir: str | os.PathLike, split: str) -> str:
    """printf-style path of the shards of one split, e.g. DIR/train-%06d.tar."""
    return str(Path(out_dir) / f"{split}-%06d.tar")


def _encode(sample: Sample) -> dict[str, Any]:
    if not _KEY_RE.match(sample.key):
        raise ValueError(f"sample key {sample.key!r} may only use letters, digits, '_' and '-'")
    if isinstance(sample.image, Image.Image):
        if sample.image.mode != "RGB":
            raise ValueError(f"sample {sample.key}: image mode is {sample.image.mode}, expected RGB")
        image_ext, image = "png", png_bytes(sample.image)
    else:
        image_ext, image = sample.image_ext, bytes(sample.image)
    return {
        "__key__": sample.key,
        image_ext: image,
        "txt": sample.caption.encode("utf-8"),
        "json": json.dumps(sample.meta, sort_keys=True).encode("utf-8"),
    }


def write_split(
    out_dir: str | os.PathLike,
    split: str,
    samples: Iterable[Sample],
    maxcount: int = DEFAULT_MAXCOUNT,
    *,
    progress: str = "",
    total: int | None = None,
) -> int:
    """Write `samples` as DIR/{split}-000000.tar, ... with at most `maxcount` per shard; return the count.

    Earlier shards of the same split are removed first, so re-running with another `maxcount`
    never leaves stale shards behind that a reader would pick up twice. progress: a label, e.g. the
    source's name; when given, a progress bar "{progress} {split}" counts the samples up to `total`.
    """
    if maxcount < 1:
        raise ValueError(f"maxcount must be at least 1, got {maxcount}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{split}-*.tar"):
        stale.unlink()
    writer = None
    count = 0
    try:
        for sample in tqdm(samples, total=total, desc=f"{progress} {split}", disable=not progress):
            if writer is None:  # opened lazily: an empty split writes no shard at all
                # mtime fixed so the same samples give byte-identical shards; an int avoids a pax header per member.
                writer = wds.ShardWriter(
                    shard_pattern(out_dir, split), maxcount=maxcount, verbose=0, mtime=0, encoder=False
                )
            writer.write(_encode(sample))
            count += 1
    finally:
        if writer is not None:
            writer.close()
    return count


def write_info(
    out_dir: str | os.PathLike,
    source: str,
    resolution: int,
    splits: dict[str, int],
    **extra: Any,
) -> dict[str, Any]:
    """Write DIR/info.json (atomically: temp file + rename) with DIR's shards in "files"; return what was written."""
    files = sorted(p.name for split in SPLITS for p in Path(out_dir).glob(f"{split}-*.tar"))
    info = {"source": source, "resolution": int(resolution), "splits": dict(splits), **extra, "files": files}
    path = Path(out_dir) / INFO_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return info
