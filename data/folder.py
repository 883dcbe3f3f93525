"""Any folder of images with a same-named .txt caption beside each, into shards.

`photos/cat1.jpg` + `photos/cat1.txt` is one sample. Images in any format of IMAGE_EXTENSIONS
and any Pillow mode are converted to RGB (data/images.py), center-cropped to a square and
resized to R x R. Captions are read as UTF-8, else cp1252, else latin-1 (with a warning that
names the files). Every file that does not become a sample is named with the reason, in the
log and in info.json ("skipped_files"): an image without a caption, a caption without an
image, a file of another type, an empty caption, an image that cannot be decoded or is larger
than the pixel limit. Hidden files and folders (".DS_Store", ".git/") are ignored.

Splits: a file goes to train, val or test by a seeded hash of its path under the folder, so
the split does not follow the folder's order (a folder sorted by category gives every split
every category) and a file keeps its split when others are added. Within a split, samples are
in hash order, so any prefix of a split is a random sample of it. In a folder so small that
the hash leaves val or test empty, the lowest-hash usable train images are moved there; a
folder with fewer usable images than splits is refused, so every stage has a val split to
evaluate on.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from latentdiff.data.captions import decode_caption
from latentdiff.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, BadImage, load_rgb
from latentdiff.data.shards import DEFAULT_MAXCOUNT, SPLITS, Sample, write_info, write_split

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)  # train, val, test
NO_CAPTION = "no caption"
NO_IMAGE = "caption without an image"


@dataclass
class FolderScan:
    """Captioned images found under a folder, and the files that are not samples, with why."""

    root: Path
    pairs: list[tuple[Path, Path]] = field(default_factory=list)  # (image, caption) in sorted order
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)


@dataclass
class Report:
    """What one conversion dropped or noticed, by file."""

    root: Path
    skipped: list[tuple[Path, str, str]] = field(default_factory=list)  # (file, reason, detail)
    fallback_captions: list[tuple[Path, str]] = field(default_factory=list)  # (caption file, encoding used)
    notes: Counter = field(default_factory=Counter)  # large images read, Pillow warnings

    def skip(self, path: Path, reason: str, detail: str = "") -> None:
        self.skipped.append((path, reason, detail))

    def name(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(reason for _, reason, _ in self.skipped).items()))


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def scan(src: str | os.PathLike) -> FolderScan:
    """Walk `src` recursively: (image, caption) pairs, and every other file with the reason it is no sample."""
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    found = FolderScan(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p, root))
    captions = {p.with_suffix(""): p for p in files if p.suffix.lower() == ".txt"}
    used: set[Path] = set()
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            continue
        if suffix not in IMAGE_EXTENSIONS:
            found.skipped.append((path, f"not an accepted image type ({suffix or 'no extension'})"))
            continue
        caption = captions.get(path.with_suffix(""))
        if caption is None:
            found.skipped.append((path, NO_CAPTION))
            continue
        found.pairs.append((path, caption))
        used.add(caption)
    found.skipped += [(p, NO_IMAGE) for p in captions.values() if p not in used]
    found.skipped.sort()
    return found


def split_of(name: str, seed: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> tuple[str, float]:
    """(split, u) for a file: u in [0, 1) is a seeded hash of `name`; val takes the lowest fraction, then test."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test), got {fractions}")
    u = int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "big") / 2**64
    total = sum(fractions)
    val, test = fractions[1] / total, fractions[2] / total
    return ("val" if u < val else "test" if u < val + test else "train"), u


def read_caption(path: Path) -> tuple[str, str]:
    """(stripped caption, encoding used); raises OSError when the file cannot be read."""
    return decode_caption(path.read_bytes())


def _caption(pair: tuple[Path, Path], report: Report) -> str | None:
    """The caption of a pair, or None (skipped, with the reason) when it is unreadable or empty."""
    image_path, caption_path = pair
    try:
        caption, encoding = read_caption(caption_path)
    except OSError as e:
        report.skip(image_path, "unreadable caption", f"{report.name(caption_path)}: {e}")
        return None
    if not caption:
        report.skip(image_path, "empty caption", report.name(caption_path))
        return None
    if encoding != "utf-8":
        report.fallback_captions.append((caption_path, encoding))
    return caption


def _image(path: Path, resolution: int, max_pixels: int | None, report: Report) -> Image.Image | None:
    try:
        return load_rgb(path, resolution, max_pixels=max_pixels, notes=report.notes)
    except BadImage as e:
        hint = "; allow it with --max-pixels N" if e.reason.startswith("larger than") else ""
        report.skip(path, e.reason, str(e)[len(e.reason) :].strip(" ()") + hint)
        return None


def _usable(pair: tuple[Path, Path], resolution: int, max_pixels: int | None, report: Report) -> bool:
    """Whether a pair makes a sample; an unusable one is recorded in `report` (and must not be tried again)."""
    probe = Report(report.root)
    ok = _caption(pair, probe) is not None and _image(pair[0], resolution, max_pixels, probe) is not None
    report.skipped += probe.skipped  # notes and fallbacks are recorded when the pair is written
    return ok


def assign_splits(
    pairs: Sequence[tuple[Path, Path]],
    root: Path,
    resolution: int,
    report: Report,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> dict[str, list[tuple[Path, Path]]]:
    """train/val/test by a seeded hash of each image's path under `root` (split_of), each in hash order.

    val and test are checked here (bad pairs go to `report`); when one is left empty although
    its fraction is positive, the lowest-hash usable train pair moves there, so a small folder
    still gets every split. train's pairs are checked when they are written.
    """
    ranked: dict[str, list[tuple[float, tuple[Path, Path]]]] = {s: [] for s in SPLITS}
    for pair in pairs:
        split, u = split_of(pair[0].relative_to(root).as_posix(), seed, fractions)
        ranked[split].append((u, pair))
    splits = {s: [pair for _, pair in sorted(ranked[s])] for s in SPLITS}
    for s in ("val", "test"):
        splits[s] = [pair for pair in splits[s] if _usable(pair, resolution, max_pixels, report)]
    for s, fraction in zip(("val", "test"), fractions[1:]):
        while fraction > 0 and not splits[s] and splits["train"]:
            pair = splits["train"].pop(0)
            if _usable(pair, resolution, max_pixels, report):
                splits[s].append(pair)
    return splits


def iter_samples(
    split: str,
    pairs: Sequence[tuple[Path, Path]],
    resolution: int,
    report: Report,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Iterator[Sample]:
    """Samples of one split; pairs that fail are recorded in `report` with the file and the reason."""
    for i, pair in enumerate(pairs):
        caption = _caption(pair, report)
        if caption is None:
            continue
        image = _image(pair[0], resolution, max_pixels, report)
        if image is None:
            continue
        yield Sample(
            key=f"{split}_{i:08d}",
            image=image,
            caption=caption,
            meta={"source": "folder", "path": report.name(pair[0])},
        )


def _log_report(report: Report) -> None:
    """Name every dropped file on the log (after the progress bars), and what was read anyway."""
    for path, reason, detail in sorted(report.skipped, key=lambda r: r[0]):
        log.warning("skipped %s: %s%s", report.name(path), reason, f" ({detail})" if detail else "")
    if report.fallback_captions:
        names = ", ".join(f"{report.name(p)} ({enc})" for p, enc in report.fallback_captions)
        log.warning("%d captions are not UTF-8 and were decoded as cp1252/latin-1; check them: %s",
                    len(report.fallback_captions), names)  # fmt: skip
    for note, n in sorted(report.notes.items()):
        log.warning("%d images: %s", n, note)


def _refuse_empty(empty: list[str], src: str | os.PathLike, report: Report) -> None:
    if empty:
        _log_report(report)
        raise ValueError(
            f"no usable image is left for the {' and '.join(empty)} split of {src} "
            f"({len(report.skipped)} files skipped: {report.by_reason()}); fix or add images"
        )


def convert(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    resolution: int,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    maxcount: int = DEFAULT_MAXCOUNT,
    progress: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """Write shards and info.json for the folder `src`.

    info["skipped_by_reason"] counts skips by reason and info["skipped_files"] names each
    ({"file", "reason"}, paths relative to `src`). Raises ValueError when the folder has no
    captioned image, or too few usable ones for every split with a positive fraction.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    found = scan(src)
    root = found.root
    if not found.pairs:
        raise ValueError(
            f"no captioned images under {src}: expected image files ({' '.join(IMAGE_EXTENSIONS)}) "
            f"each with a same-named .txt caption beside it ({len(found.skipped)} other files found)"
        )
    needed = [s for s, f in zip(SPLITS, fractions) if f > 0]
    if len(found.pairs) < len(needed):
        raise ValueError(
            f"{src} has {len(found.pairs)} captioned images; a dataset needs at least {len(needed)} (one each for "
            f"{', '.join(needed)}), so that training can be evaluated: add images"
        )
    report = Report(root, skipped=[(path, reason, "") for path, reason in found.skipped])
    splits = assign_splits(found.pairs, root, resolution, report, seed, fractions, max_pixels)
    _refuse_empty([s for s in needed if s != "train" and not splits[s]], src, report)  # before writing anything
    counts = {}
    for split, pairs in splits.items():
        samples = iter_samples(split, pairs, resolution, report, max_pixels)
        label = "folder" if progress else ""
        counts[split] = write_split(out_dir, split, samples, maxcount=maxcount, progress=label, total=len(pairs))
    _refuse_empty([s for s in needed if counts[s] == 0], src, report)  # train, whose files are read only now
    _log_report(report)
    return write_info(
        out_dir,
        source="folder",
        resolution=resolution,
        splits=counts,
        seed=seed,
        fractions=list(fractions),
        split_by="sha256 of seed and path",
        skipped=len(report.skipped),
        skipped_by_reason=report.by_reason(),
        skipped_files=[{"file": report.name(p), "reason": r} for p, r, _ in sorted(report.skipped, key=lambda r: r[0])],
        captions_not_utf8={report.name(p): enc for p, enc in report.fallback_captions},
        notes=dict(sorted(report.notes.items())),
        max_pixels=max_pixels,
        source_dir=str(root.resolve()),
    )
