"""Any folder of captioned images, into shards.

`photos/cat1.jpg` + `photos/cat1.txt` is one sample (the caption file's extension is
`caption_ext`: kohya's trainer writes `.caption`); a diffusers / Hugging Face imagefolder
`metadata.jsonl` or `metadata.csv` (data/metadata.py) gives the captions of the images it
lists, and wins over their caption files. Images in any format of IMAGE_EXTENSIONS and any
Pillow mode are converted to RGB (data/images.py), center-cropped to a square and resized to
R x R. A caption file is decoded by its byte-order mark, else as UTF-8, else cp1252, else
latin-1 (with a warning that names the files); a caption holding a NUL character is refused;
of a caption with several lines the first is kept (kohya's rule), with a warning that names
them. Every file that does not become a sample is named with the reason, in the log and in
info.json ("skipped_files"): an image without a caption, a caption without an image, a file of
another type, an empty or NUL-holding caption, an image that cannot be decoded or is larger
than the pixel limit, a metadata line that cannot be read. Hidden files and folders
(".DS_Store", ".git/") are ignored.

Splits: a file goes to train, val or test by a seeded hash of its path under the folder, so
the split does not follow the folder's order (a folder sorted by category gives every split
every category) and a file keeps its split when others are added. The val and test fractions
are the caller's (default 5% each). Within a split, samples are in hash order, so any prefix of
a split is a random sample of it. In a folder so small that the hash leaves val or test empty,
the lowest-hash usable train images are moved there; a folder with fewer usable images than
splits is refused, so every stage has a val split to evaluate on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from latentdiff.data.captions import GUESSED_ENCODINGS, BadCaption, decode_caption, first_line, refuse_nul
from latentdiff.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, BadImage, load_rgb
from latentdiff.data.metadata import DEFAULT_CAPTION_COLUMN, METADATA_FILES, Listed, read_metadata
from latentdiff.data.shards import DEFAULT_MAXCOUNT, SPLITS, Sample, write_info, write_split

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)  # train, val, test
DEFAULT_CAPTION_EXT = ".txt"
NO_CAPTION = "no caption"
NO_IMAGE = "caption without an image"

Caption = Path | Listed  # a caption file, or a metadata file's line
Pair = tuple[Path, Caption]  # (image, its caption)


@dataclass
class FolderScan:
    """Captioned images found under a folder, and the files that are not samples, with why."""

    root: Path
    pairs: list[Pair] = field(default_factory=list)  # in sorted order of the images
    skipped: list[tuple[Path, str, str]] = field(default_factory=list)  # (file, reason, detail)
    images: int = 0  # image files found, captioned or not


@dataclass
class Report:
    """What one conversion dropped or noticed, by file."""

    root: Path
    skipped: list[tuple[Path, str, str]] = field(default_factory=list)  # (file, reason, detail)
    fallback_captions: list[tuple[Path, str]] = field(default_factory=list)  # (caption file, encoding used)
    first_line_only: list[str] = field(default_factory=list)  # captions of several lines, by name
    captions_from: Counter = field(default_factory=Counter)  # samples by where their caption came from
    notes: Counter = field(default_factory=Counter)  # large images read, Pillow warnings

    def skip(self, path: Path, reason: str, detail: str = "") -> None:
        self.skipped.append((path, reason, detail))

    def name(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(reason for _, reason, _ in self.skipped).items()))


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def check_caption_ext(ext: str) -> str:
    """The caption files' extension in lower case with its dot ("caption" -> ".caption"); ValueError if it is none."""
    norm = "." + ext.strip().lower().lstrip(".")
    if not re.fullmatch(r"\.[a-z0-9_-]+", norm):
        raise ValueError(f"--caption-ext {ext!r} is not a file extension; give one such as .txt or .caption")
    if norm in IMAGE_EXTENSIONS:
        raise ValueError(f"--caption-ext {norm} is an image extension; give the captions' extension, e.g. .caption")
    return norm


def check_fractions(val: float, test: float) -> tuple[float, float, float]:
    """(train, val, test) fractions from the --val-fraction and --test-fraction flags; ValueError naming the flag."""
    if not 0 < val < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val} (every stage evaluates on val)")
    if not 0 <= test < 1:
        raise ValueError(f"--test-fraction must be in [0, 1), got {test}")
    if val + test >= 1:
        raise ValueError(f"--val-fraction {val} and --test-fraction {test} leave train nothing: keep their sum below 1")
    return round(1 - val - test, 12), val, test


def _listed_captions(files: list[Path], caption_column: str, found: FolderScan) -> dict[Path, Listed]:
    """{image: Listed} of every metadata file among `files`; a line's problems go to `found.skipped`."""
    listed: dict[Path, Listed] = {}
    for meta in (p for p in files if p.name in METADATA_FILES):
        entries, skipped = read_metadata(meta, caption_column)
        found.skipped += skipped
        for image, entry in entries.items():
            if image in listed:  # metadata.csv and metadata.jsonl of one folder, or nested folders
                used = f"{listed[image].source.relative_to(found.root)} line {listed[image].line} is used"
                found.skipped.append((meta, "image listed twice", f"line {entry.line}: {image.name} ({used})"))
            else:
                listed[image] = entry
    present = set(files)
    for image, entry in list(listed.items()):
        if image not in present:
            found.skipped.append((entry.source, "listed image is missing", f"line {entry.line}: "
                                  f"{image.relative_to(entry.source.parent).as_posix()}"))  # fmt: skip
            del listed[image]
    return listed


def scan(
    src: str | os.PathLike, caption_ext: str = DEFAULT_CAPTION_EXT, caption_column: str = DEFAULT_CAPTION_COLUMN
) -> FolderScan:
    """Walk `src` recursively: (image, caption) pairs, and every other file with the reason it is no sample.

    An image's caption is its metadata file's line when one lists it, else its same-named
    `caption_ext` file (which is then named as not read). Raises ValueError when a metadata file
    has no "file_name" or `caption_column` column.
    """
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    found = FolderScan(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p, root))
    listed = _listed_captions(files, caption_column, found)
    captions = {p.with_suffix(""): p for p in files if p.suffix.lower() == caption_ext}
    used: set[Path] = set()
    for path in files:
        suffix = path.suffix.lower()
        if suffix == caption_ext or path.name in METADATA_FILES:
            continue
        if suffix not in IMAGE_EXTENSIONS:
            found.skipped.append((path, f"not an accepted image type ({suffix or 'no extension'})", ""))
            continue
        found.images += 1
        caption = captions.get(path.with_suffix(""))
        if caption is not None:
            used.add(caption)
        if path in listed:
            found.pairs.append((path, listed[path]))
            if caption is not None:
                reason = f"caption file not read: {listed[path].source.name} gives this image's caption"
                found.skipped.append((caption, reason, ""))
        elif caption is not None:
            found.pairs.append((path, caption))
        else:
            found.skipped.append((path, NO_CAPTION, ""))
    found.skipped += [(p, NO_IMAGE, "") for p in captions.values() if p not in used]
    found.skipped.sort(key=lambda s: (s[0], s[1], s[2]))
    return found


def no_captions_message(src: str | os.PathLike, found: FolderScan, caption_ext: str) -> str:
    """Why a folder gave no captioned image, naming the layout found and the flag that reads it."""
    root = found.root
    if not found.images:
        return (
            f"no images under {src}: expected image files ({' '.join(IMAGE_EXTENSIONS)}) each with a same-named "
            f"{caption_ext} caption beside it, or a metadata.jsonl ({len(found.skipped)} other files found)"
        )
    files = [p for p in root.rglob("*") if p.is_file() and not _hidden(p, root)]
    stems = {p.with_suffix("") for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}
    beside = Counter(
        p.suffix.lower() for p in files if p.with_suffix("") in stems and p.suffix.lower() not in IMAGE_EXTENSIONS
    )
    said = f"no captioned images under {src}: {found.images} images and no {caption_ext} captions"
    if beside:
        ext, n = beside.most_common(1)[0]
        return f"{said}; {n} have a same-named {ext} file: if those are the captions, pass --caption-ext {ext}"
    other = sorted(p.name for p in files if p.stem == "metadata" and p.name not in METADATA_FILES)
    if other:
        return f"{said}; {other[0]} is not read: give the captions as metadata.jsonl or metadata.csv (file_name, text)"
    if any(p.name in METADATA_FILES for p in files):
        return f"{said}; its metadata file gave none ({len(found.skipped)} files skipped: see the log)"
    return (
        f"{said}: give each image a same-named caption file (--caption-ext for another extension than "
        f'{caption_ext}), or a metadata.jsonl with a "file_name" and "text" per line (diffusers\' imagefolder)'
    )


def split_of(name: str, seed: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> tuple[str, float]:
    """(split, u) for a file: u in [0, 1) is a seeded hash of `name`; val takes the lowest fraction, then test."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test), got {fractions}")
    u = int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "big") / 2**64
    total = sum(fractions)
    val, test = fractions[1] / total, fractions[2] / total
    return ("val" if u < val else "test" if u < val + test else "train"), u


def read_caption(path: Path) -> tuple[str, str]:
    """(caption, encoding used); raises OSError when the file cannot be read, BadCaption when it holds a NUL."""
    return decode_caption(path.read_bytes())


def _caption(pair: Pair, report: Report) -> str | None:
    """The caption of a pair (its first line), or None (skipped, with the reason) when it is unreadable or empty."""
    image_path, source = pair
    if isinstance(source, Listed):
        name, encoding = f"{report.name(source.source)} line {source.line}", "utf-8"
        try:
            text = refuse_nul(source.text)
        except BadCaption as e:
            report.skip(image_path, e.reason, f"{name}: {e.detail}")
            return None
    else:
        name = report.name(source)
        try:
            text, encoding = read_caption(source)
        except OSError as e:
            report.skip(image_path, "unreadable caption", f"{name}: {e}")
            return None
        except BadCaption as e:
            report.skip(image_path, e.reason, f"{name}: {e.detail}")
            return None
    caption, more = first_line(text)
    if not caption:
        report.skip(image_path, "empty caption", name)
        return None
    if encoding in GUESSED_ENCODINGS:
        report.fallback_captions.append((source, encoding))
    if more:
        report.first_line_only.append(name)
    return caption


def _image(path: Path, resolution: int, max_pixels: int | None, report: Report) -> Image.Image | None:
    try:
        return load_rgb(path, resolution, max_pixels=max_pixels, notes=report.notes)
    except BadImage as e:
        hint = "; allow it with --max-pixels N" if e.reason.startswith("larger than") else ""
        report.skip(path, e.reason, str(e)[len(e.reason) :].strip(" ()") + hint)
        return None


def _usable(pair: Pair, resolution: int, max_pixels: int | None, report: Report) -> bool:
    """Whether a pair makes a sample; an unusable one is recorded in `report` (and must not be tried again)."""
    probe = Report(report.root)
    ok = _caption(pair, probe) is not None and _image(pair[0], resolution, max_pixels, probe) is not None
    report.skipped += probe.skipped  # notes and fallbacks are recorded when the pair is written
    return ok


def assign_splits(
    pairs: Sequence[Pair],
    root: Path,
    resolution: int,
    report: Report,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> dict[str, list[Pair]]:
    """train/val/test by a seeded hash of each image's path under `root` (split_of), each in hash order.

    val and test are checked here (bad pairs go to `report`); when one is left empty although
    its fraction is positive, the lowest-hash usable train pair moves there, so a small folder
    still gets every split. train's pairs are checked when they are written.
    """
    ranked: dict[str, list[tuple[float, Pair]]] = {s: [] for s in SPLITS}
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
    pairs: Sequence[Pair],
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
        source = pair[1]
        report.captions_from[report.name(source.source) if isinstance(source, Listed) else f"*{source.suffix}"] += 1
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
    if report.first_line_only:
        log.warning("%d captions have more than one line; the first line of each was kept (kohya's rule): %s",
                    len(report.first_line_only), ", ".join(report.first_line_only))  # fmt: skip
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
    caption_ext: str = DEFAULT_CAPTION_EXT,
    caption_column: str = DEFAULT_CAPTION_COLUMN,
) -> dict[str, Any]:
    """Write shards and info.json for the folder `src`.

    info["skipped_by_reason"] counts skips by reason and info["skipped_files"] names each
    ({"file", "reason"}, paths relative to `src`); info["captions_from"] counts the samples by
    where their caption came from. Raises ValueError when the folder has no captioned image (the
    message names the layout found and the flag that reads it), or too few usable ones for every
    split with a positive fraction.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    caption_ext = check_caption_ext(caption_ext)
    found = scan(src, caption_ext, caption_column)
    root = found.root
    if not found.pairs:
        raise ValueError(no_captions_message(src, found, caption_ext))
    needed = [s for s, f in zip(SPLITS, fractions) if f > 0]
    if len(found.pairs) < len(needed):
        raise ValueError(
            f"{src} has {len(found.pairs)} captioned images; a dataset needs at least {len(needed)} (one each for "
            f"{', '.join(needed)}), so that training can be evaluated: add images"
        )
    report = Report(root, skipped=list(found.skipped))
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
        caption_ext=caption_ext,
        caption_column=caption_column,
        captions_from=dict(sorted(report.captions_from.items())),
        captions_not_utf8={report.name(p): enc for p, enc in report.fallback_captions},
        captions_first_line_only=report.first_line_only,
        notes=dict(sorted(report.notes.items())),
        max_pixels=max_pixels,
        source_dir=str(root.resolve()),
    )
