"""Any folder of images with a same-named .txt caption beside each, into shards.

`photos/cat1.jpg` + `photos/cat1.txt` is one sample. Images are resized (shorter side to R)
and center-cropped to R x R RGB. An image without a caption, with an empty caption, or that
cannot be decoded is skipped and counted, never a crash. The split is a seeded permutation of
the sorted file list, so the same folder and seed always give the same split.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from latentdiff.data.images import fit_square, to_rgb
from latentdiff.data.shards import DEFAULT_MAXCOUNT, SPLITS, Sample, write_info, write_split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)  # train, val, test


@dataclass
class FolderScan:
    """Captioned images found under a folder, and what was skipped and why."""

    pairs: list[tuple[Path, Path]] = field(default_factory=list)  # (image, caption) in sorted order
    skipped: Counter = field(default_factory=Counter)  # reason -> count


def scan(src: str | os.PathLike) -> FolderScan:
    """Walk `src` recursively for images and their captions (images without a .txt are counted)."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"image folder {src} does not exist or is not a directory")
    found = FolderScan()
    for image in sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        caption = image.with_suffix(".txt")
        if caption.is_file():
            found.pairs.append((image, caption))
        else:
            found.skipped["no caption"] += 1
    return found


def split_counts(n: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict[str, int]:
    """Split sizes for n items; val and test keep at least one item each whenever n allows."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test), got {fractions}")
    total = sum(fractions)
    n_val = round(n * fractions[1] / total)
    n_test = round(n * fractions[2] / total)
    if fractions[1] > 0 and n_val == 0 and n >= 2:
        n_val = 1
    if fractions[2] > 0 and n_test == 0 and n >= 3:
        n_test = 1
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def load_image(path: Path, resolution: int) -> Image.Image:
    """Decode, make RGB, resize the shorter side and center-crop; raises on an unreadable file."""
    with Image.open(path) as image:
        image.load()
        return fit_square(to_rgb(image), resolution)


def read_caption(path: Path) -> str:
    """The stripped caption; raises OSError/UnicodeDecodeError when unreadable."""
    return path.read_text(encoding="utf-8").strip()


def problem(image_path: Path, caption_path: Path, resolution: int) -> str | None:
    """Why this pair cannot be a sample ("empty caption", ...), or None when it is fine."""
    try:
        if not read_caption(caption_path):
            return "empty caption"
    except (OSError, UnicodeDecodeError):
        return "unreadable caption"
    try:
        load_image(image_path, resolution)
    except (OSError, ValueError, Image.DecompressionBombError):
        return "unreadable image"
    return None


def assign_splits(
    pairs: Sequence[tuple[Path, Path]],
    resolution: int,
    skipped: Counter,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> dict[str, list[tuple[Path, Path]]]:
    """Seeded permutation of `pairs` cut into train/val/test; each split keeps the sorted order.

    val and test are filled first with pairs checked to be usable (bad ones are counted in
    `skipped` and replaced by the next in the permutation), so a corrupt file never leaves a
    small val split empty; train's pairs are checked when they are written.
    """
    counts = split_counts(len(pairs), fractions)
    quota = {"val": counts["val"], "test": counts["test"]}
    chosen: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i in np.random.default_rng(seed % 2**63).permutation(len(pairs)):
        split = next((s for s in ("val", "test") if len(chosen[s]) < quota[s]), "train")
        if split != "train":
            reason = problem(*pairs[i], resolution)
            if reason is not None:
                skipped[reason] += 1
                continue
        chosen[split].append(int(i))
    return {s: [pairs[i] for i in sorted(chosen[s])] for s in SPLITS}


def iter_samples(
    split: str, pairs: Sequence[tuple[Path, Path]], root: Path, resolution: int, skipped: Counter
) -> Iterator[Sample]:
    """Samples of one split; unreadable images and empty captions are counted in `skipped`."""
    for i, (image_path, caption_path) in enumerate(pairs):
        try:
            caption = read_caption(caption_path)
        except (OSError, UnicodeDecodeError):
            skipped["unreadable caption"] += 1
            continue
        if not caption:
            skipped["empty caption"] += 1
            continue
        try:
            image = load_image(image_path, resolution)
        except (OSError, ValueError, Image.DecompressionBombError):
            skipped["unreadable image"] += 1
            continue
        yield Sample(
            key=f"{split}_{i:08d}",
            image=image,
            caption=caption,
            meta={"source": "folder", "path": image_path.relative_to(root).as_posix()},
        )


def convert(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    resolution: int,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    maxcount: int = DEFAULT_MAXCOUNT,
    progress: bool = False,
) -> dict[str, Any]:
    """Write shards and info.json for the folder `src`; info["skipped"] counts skips by reason."""
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    found = scan(src)
    if not found.pairs:
        raise ValueError(
            f"no captioned images under {src}: expected image files ({', '.join(IMAGE_EXTENSIONS)}) "
            f"each with a same-named .txt caption beside it ({sum(found.skipped.values())} images lack one)"
        )
    skipped = Counter(found.skipped)
    counts = {}
    for split, pairs in assign_splits(found.pairs, resolution, skipped, seed, fractions).items():
        samples = iter_samples(split, pairs, Path(src), resolution, skipped)
        samples = tqdm(samples, total=len(pairs), desc=f"folder {split}", disable=not progress)
        counts[split] = write_split(out_dir, split, samples, maxcount=maxcount)
    return write_info(
        out_dir,
        source="folder",
        resolution=resolution,
        splits=counts,
        seed=seed,
        fractions=list(fractions),
        skipped=sum(skipped.values()),
        skipped_by_reason=dict(sorted(skipped.items())),
        source_dir=str(Path(src).resolve()),
    )
