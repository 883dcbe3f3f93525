"""Image sets for scoring: shards or a folder of PNG/JPG -> one (N, 3, H, W) uint8 tensor.

torch-fidelity's feature extractors take uint8 RGB batches (B, 3, H, W), so every set is brought
to that form here, once, and checked. Image files go through the same conversion as the data
commands and the shard reader (data/images.py load_rgb: every Pillow mode to RGB, alpha
composited on white, 16-bit scaled); a file that cannot be read is refused with a message that
names it.

    real = load_image_set("datasets/fmnist", split="test", limit=10000)     # shards
    fake = load_image_set("samples/")                                   # a folder of PNGs

Two sets compared by FID meet at one size: `match_size` brings the generated set to the real
set's (antialiased bilinear, the filter our extractors resize with) and says so, or refuses when
the aspect ratios differ, since that would distort or crop one set and FID would measure that.
The real set decides because it is what is modelled: a model that makes smaller images is
judged, upsampled, at the data's size, and detail beyond the data's size cannot be judged.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from latentdiff.core.pixels import to_uint8
from latentdiff.data.images import IMAGE_EXTENSIONS, BadImage, load_rgb
from latentdiff.data.reader import read_once

IMAGE_SUFFIXES = IMAGE_EXTENSIONS


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 3, H, W) uint8
    source: str  # where the images came from, for reports
    captions: list[str] = field(default_factory=list)  # per image, when read from shards
    metas: list[dict[str, Any]] = field(default_factory=list)  # per image json, when read from shards

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, start: int, stop: int) -> ImageSet:
        return ImageSet(
            self.images[start:stop], f"{self.source}[{start}:{stop}]", self.captions[start:stop], self.metas[start:stop]
        )


class UInt8Images(Dataset):
    """A (N, 3, H, W) uint8 tensor as the map-style Dataset torch-fidelity reads its inputs from."""

    def __init__(self, images: torch.Tensor):
        self.images = as_uint8_rgb(images)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def as_uint8_rgb(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    """(B, 3, H, W) uint8 from uint8 or float-in-[-1, 1] images with 1 or 3 channels; anything else refused."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{what}: expected a batch (B, C, H, W), got {shape}")
    if images.shape[1] not in (1, 3):
        raise ValueError(
            f"{what}: expected 1 (grayscale) or 3 (RGB) channels, got {images.shape[1]} "
            f"in shape {tuple(images.shape)}; drop the alpha channel or convert to RGB first"
        )
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise ValueError(f"{what}: expected uint8 in [0, 255] or float in [-1, 1], got {images.dtype}")
        images = to_uint8(images)  # clamps to [-1, 1] and rounds as PNG writers do
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous()


RESIZE_FILTER = "antialiased bilinear"


def match_size(images: torch.Tensor, size: tuple[int, int], what: str = "generated") -> tuple[torch.Tensor, str | None]:
    """(images at `size` (N, 3, H, W) uint8, a sentence saying how) for images (N, C, h, w); (images, None) if equal.

    Raises ValueError when the aspect ratios differ by more than 1%: resizing would distort one set.
    """
    images = as_uint8_rgb(images, f"{what} images")
    have, want = tuple(images.shape[-2:]), (int(size[0]), int(size[1]))
    if have == want:
        return images, None
    words = f"{what} {have[1]}x{have[0]}"  # W x H, as image sizes are written
    if abs(have[1] * want[0] - want[1] * have[0]) > 0.01 * want[1] * have[0]:
        raise ValueError(
            f"{words} images cannot be compared with real {want[1]}x{want[0]} images: the aspect ratios differ, "
            "so resizing would distort one set; give both sets one shape (`latentdiff fid` takes --resolution R "
            "to center-crop and resize both to R x R on reading)"
        )
    out = F.interpolate(images.float(), size=want, mode="bilinear", align_corners=False, antialias=True)
    note = (
        f"{words} resized to {want[1]}x{want[0]}, the real images' size ({RESIZE_FILTER}), before the feature extractor"
    )
    return out.round().clamp(0, 255).to(torch.uint8), note


def pixel_hash(images: torch.Tensor) -> str:
    """Content hash of a uint8 image tensor (shape and pixels): the data half of a statistics cache key."""
    images = as_uint8_rgb(images).cpu().contiguous()
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.numpy().tobytes())
    return h.hexdigest()[:20]


def _is_shards(source: str) -> bool:
    if os.path.isdir(source):
        return any(p.suffix == ".tar" for p in Path(source).iterdir()) or (Path(source) / "info.json").exists()
    return source.endswith(".tar") or "{" in source or source.startswith("pipe:") or "://" in source


def load_image_set(
    source: str | os.PathLike, *, split: str = "test", limit: int | None = None, resolution: int | None = None
) -> ImageSet:
    """Images from a shard directory or pattern (split `split`) or a folder of image files, in a fixed order."""
    source = str(source)
    if limit is not None and limit < 1:
        raise ValueError(f"the image limit must be at least 1, got {limit}")
    if _is_shards(source):
        return _from_shards(source, split, limit, resolution)
    if os.path.isdir(source):
        return _from_folder(Path(source), limit, resolution)
    raise FileNotFoundError(
        f"{source} is neither a folder of images nor webdataset shards; pass a directory of "
        f"image files ({' '.join(IMAGE_SUFFIXES)}) or a dataset directory"
    )


def _from_shards(data: str, split: str, limit: int | None, resolution: int | None) -> ImageSet:
    loader = read_once(data, split, 250, resolution)
    chunks, captions, metas = [], [], []
    for batch in loader:
        chunks.append(batch["image"])  # (B, 3, H, W) uint8: the stored pixels
        captions += batch["caption"]
        metas += batch["meta"]
        if limit is not None and len(captions) >= limit:
            break
    if not chunks:
        raise ValueError(f"no readable {split!r} images in {data}")
    images = torch.cat(chunks)[:limit]
    return ImageSet(images, f"{data} ({split})", captions[:limit], metas[:limit])


def folder_images(folder: Path) -> list[Path]:
    """The image files of a folder, sorted; for a `latentdiff generate` output, only the images it generated.

    generate writes settings.json listing its images beside grid.png: the grid (and anything
    else in the folder) is not a sample and must not enter a FID.
    """
    settings = folder / "settings.json"
    if settings.is_file():
        import json

        try:
            files = json.loads(settings.read_text()).get("files")
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(
                f"{settings} is not a settings file written by `latentdiff generate`; remove it or score another folder"
            ) from None
        if isinstance(files, list):
            missing = [name for name in files if not (folder / name).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{folder}: settings.json lists {missing[0]} but it is missing "
                    f"({len(missing)} missing); regenerate into an empty folder"
                )
            return [folder / name for name in sorted(files)]
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _from_folder(folder: Path, limit: int | None, resolution: int | None) -> ImageSet:
    files = folder_images(folder)[:limit]
    if not files:
        raise FileNotFoundError(f"no {', '.join(IMAGE_SUFFIXES)} files in {folder}")
    arrays, sizes = [], {}
    for path in files:
        try:
            image = load_rgb(path, resolution)
        except BadImage as e:
            raise ValueError(f"cannot read image {path}: {e}; remove it or replace it") from None
        sizes.setdefault(image.size, path.name)
        arrays.append(np.asarray(image, dtype=np.uint8))  # (H, W, 3)
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h} ({name})" for (w, h), name in list(sizes.items())[:3])
        raise ValueError(
            f"images in {folder} have different sizes: {listed}; pass --resolution R to resize and "
            "center-crop them all to R x R"
        )
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
    return ImageSet(images, str(folder))
