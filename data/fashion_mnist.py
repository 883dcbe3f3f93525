"""Fashion-MNIST (Xiao et al. 2017) from its IDX files into captioned shards.

Debian's `dataset-fashion-mnist` package installs the four IDX files under
/usr/share/datasets/fashion-mnist; any folder holding them (gzipped or not) works too.
Images are 28x28 grayscale; they are padded with 2 px of black to 32x32 (no interpolation,
so the pixels stay exactly the originals), made RGB, and only then resized for other resolutions.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from latentdiff.data.captions import class_prompt, with_article
from latentdiff.data.images import RESAMPLE, gray_to_rgb
from latentdiff.data.shards import DEFAULT_MAXCOUNT, Sample, write_info, write_split

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = (
    "run `apt-get install -y dataset-fashion-mnist` (installs the IDX files under "
    "/usr/share/datasets/fashion-mnist) or pass --source DIR with the four IDX files"
)
# Readable names of labels 0..9 (the dataset's T-shirt/top, Trouser, ..., Ankle boot).
CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
# "{}" is the class name with its article, so "an ankle boot" and "a sneaker" both read right.
CAPTION_TEMPLATES = (
    "a photo of {}",
    "{}",
    "a black and white photo of {}",
    "a grayscale picture of {}",
    "a small photo of {}",
    "a product photo of {}",
)
# Fashion-MNIST's own split: the last 5,000 of the 60,000 training images are held out as val.
VAL_FRACTION_DENOM = 12  # 60,000 // 12 = 5,000
PAD = 2  # 28 + 2 * 2 = 32

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# (split of the IDX files, kind) -> file stem; the .gz suffix and "."/"-" before "idx" both occur.
_STEMS = {
    ("train", "images"): ("train-images", "idx3-ubyte"),
    ("train", "labels"): ("train-labels", "idx1-ubyte"),
    ("t10k", "images"): ("t10k-images", "idx3-ubyte"),
    ("t10k", "labels"): ("t10k-labels", "idx1-ubyte"),
}


def caption_for(label: int, template: int) -> str:
    """Caption of class `label` through CAPTION_TEMPLATES[template]."""
    return CAPTION_TEMPLATES[template].format(with_article(CLASSES[label]))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzipped) into an array of its stored shape and dtype."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: gzip data is corrupt ({e}); re-download or re-install the file") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: its magic number is {raw[:4].hex() or 'missing'}, "
            "expected 0000 followed by a type byte (08 for uint8) and the number of dimensions"
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header is truncated ({len(raw)} bytes, need {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX header says shape {shape} ({expected} bytes of data) "
            f"but the file holds {len(raw) - header}; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx_file(source: str | os.PathLike, part: str, kind: str) -> Path:
    """Path of one of the four IDX files in `source`, accepting .gz or not and '-' or '.' before idx."""
    stem, suffix = _STEMS[(part, kind)]
    source = Path(source)
    for sep in ("-", "."):
        for ext in (".gz", ""):
            candidate = source / f"{stem}{sep}{suffix}{ext}"
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"Fashion-MNIST file {stem}-{suffix}[.gz] not found in {source}: {INSTALL_HINT}")


def load_arrays(source: str | os.PathLike = DEFAULT_SOURCE) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train", "val", "test"} -> (images (N, 28, 28) uint8, labels (N,) int64)."""
    if not Path(source).is_dir():
        raise FileNotFoundError(f"Fashion-MNIST source directory {source} does not exist: {INSTALL_HINT}")
    parts = {}
    for part in ("train", "t10k"):
        images = read_idx(find_idx_file(source, part, "images"))
        labels = read_idx(find_idx_file(source, part, "labels"))
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"{part} images in {source} have shape {images.shape} {images.dtype}, expected (N, H, W) uint8"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{part} labels in {source} have shape {labels.shape}, expected ({images.shape[0]},)")
        if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
            raise ValueError(f"{part} labels in {source} are outside 0..{len(CLASSES) - 1}")
        parts[part] = (images, labels.astype(np.int64))
    images, labels = parts["train"]
    n_val = len(labels) // VAL_FRACTION_DENOM
    if n_val == 0 and len(labels) >= 2:  # keep a val sample even for tiny stand-in sources
        n_val = 1
    n_train = len(labels) - n_val
    return {
        "train": (images[:n_train], labels[:n_train]),
        "val": (images[n_train:], labels[n_train:]),
        "test": parts["t10k"],
    }


def to_image(pixels: np.ndarray, resolution: int = 32) -> Image.Image:
    """(28, 28) uint8 -> RGB image: pad 2 px black to 32x32, then resize only if resolution != 32."""
    padded = np.pad(pixels, PAD, mode="constant", constant_values=0)
    image = gray_to_rgb(padded)
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), RESAMPLE)
    return image


def iter_samples(
    split: str, images: np.ndarray, labels: np.ndarray, resolution: int = 32, seed: int = 0
) -> Iterator[Sample]:
    """Samples of one split, each with a caption template drawn from a generator seeded by (seed, split)."""
    rng = np.random.default_rng([seed % 2**63, ("train", "val", "test").index(split)])
    templates = rng.integers(0, len(CAPTION_TEMPLATES), size=len(labels))
    for i, (pixels, label) in enumerate(zip(images, labels)):
        label = int(label)
        yield Sample(
            key=f"{split}_{i:08d}",
            image=to_image(pixels, resolution),
            caption=caption_for(label, int(templates[i])),
            meta={"label": label, "class": CLASSES[label], "source": "fashion-mnist"},
        )


def convert(
    out_dir: str | os.PathLike,
    source: str | os.PathLike = DEFAULT_SOURCE,
    resolution: int = 32,
    maxcount: int = DEFAULT_MAXCOUNT,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Write Fashion-MNIST shards and info.json into `out_dir`; return the info dict."""
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    arrays = load_arrays(source)
    counts = {}
    for split, (images, labels) in arrays.items():
        samples = iter_samples(split, images, labels, resolution, seed)
        label = "fashion-mnist" if progress else ""
        counts[split] = write_split(out_dir, split, samples, maxcount=maxcount, progress=label, total=len(labels))
    return write_info(
        out_dir,
        source="fashion-mnist",
        resolution=resolution,
        splits=counts,
        classes=list(CLASSES),
        class_prompts=[class_prompt(c) for c in CLASSES],
        caption_templates=list(CAPTION_TEMPLATES),
        seed=seed,
        skipped=0,
        source_dir=str(Path(source).resolve()),
    )
