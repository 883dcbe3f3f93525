"""What a run shows and records: a progress bar, metrics.jsonl, TensorBoard, image grids."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .pixels import to_uint8


def save_grid(
    images: torch.Tensor,
    path: str | Path,
    nrow: int | None = None,
    *,
    labels: list[str] | None = None,
    title: str | None = None,
    min_cell: int = 96,
) -> Path:
    """Save (B, C, H, W) images in [-1, 1] as one PNG grid that a person can look at.

    nrow: images per row (default: a square). Images smaller than `min_cell` pixels are
    enlarged by an integer factor without smoothing (nearest neighbour), so 32-px samples
    are seen as they are rather than as blurs or thumbnails. labels: one text per row,
    written to the left of it (e.g. its prompt); title: a line above the grid (e.g. the
    guidance and seed); a line break in either is shown as " / ". Raises ValueError when the number of
    labels is not the number of rows.
    """
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = images.detach().float().cpu().clamp(-1, 1) * 0.5 + 0.5
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    rows = math.ceil(images.shape[0] / nrow)
    if labels is not None and len(labels) != rows:
        raise ValueError(f"save_grid: {len(labels)} labels for {rows} rows")
    factor = max(1, math.ceil(min_cell / max(images.shape[-2:])))
    if factor > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    picture = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    if labels or title:
        labels = [_one_line(t) for t in labels] if labels else labels
        title = _one_line(title) if title else title
        font = ImageFont.load_default(size=14)
        measure = ImageDraw.Draw(picture)
        label_w = 8 + max((measure.textlength(t, font=font) for t in labels), default=0) if labels else 0
        label_w = int(min(label_w, 420))  # a very long prompt is cut rather than dwarfing the images
        title_h = 26 if title else 0
        canvas = Image.new("RGB", (picture.width + label_w, picture.height + title_h), "white")
        canvas.paste(picture, (label_w, title_h))
        draw = ImageDraw.Draw(canvas)
        if title:
            draw.text((6, 5), title, fill="black", font=font)
        cell = images.shape[-2] + 2
        for i, text in enumerate(labels or []):
            while text and draw.textlength(text, font=font) > label_w - 8:
                text = text[:-2] + "…"
            draw.text((4, title_h + 2 + i * cell + cell // 2), text, fill="black", font=font, anchor="lm")
        picture = canvas
    picture.save(path)
    return path


def _one_line(text: str) -> str:
    """A label drawn on one line (Pillow measures no multi-line text): line breaks as " / "."""
    return " / ".join(text.splitlines()) if "\n" in text or "\r" in text else text


def save_png(
    image: torch.Tensor, path: str | Path, text: dict[str, str] | None = None, itxt: dict[str, str] | None = None
) -> Path:
    """Save one (C, H, W) image in [-1, 1] (C = 1 or 3) as a PNG at its own resolution.

    text: text chunks written as the Stable Diffusion web UI writes its "parameters" (Pillow's
    add_text: tEXt when Latin-1 holds the text, else iTXt), so its readers find them.
    itxt: chunks always written as iTXt, UTF-8 (e.g. latentdiff's JSON settings).
    """
    from PIL import Image, PngImagePlugin

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(image).permute(1, 2, 0).cpu().numpy()  # (H, W, C)
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    for key, value in (itxt or {}).items():
        info.add_itxt(key, value)
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path, pnginfo=info)
    return path


class MetricLogger:
    """Appends one JSON line per log call and mirrors scalars to TensorBoard (main rank only)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._writer = None
        self._file = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.run_dir / "metrics.jsonl", "a")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
                except ImportError:  # tensorboard is a dependency, but stay usable without it
                    self._writer = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        for k, v in metrics.items():
            row[k] = float(v) if isinstance(v, (torch.Tensor,)) else v
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._writer is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self._writer.add_scalar(k, v, step)

    def image(self, tag: str, step: int, picture: torch.Tensor | str | Path) -> None:
        """Show a picture in TensorBoard's IMAGES tab under `tag` at `step`.

        picture: (B, C, H, W) images in [-1, 1] (shown as one grid), or the path of a PNG such as a
        grid save_grid wrote (shown as it is, labels and enlargement included).
        """
        if self._writer is None:
            return
        if isinstance(picture, torch.Tensor):
            from torchvision.utils import make_grid

            self._writer.add_image(tag, make_grid(picture.detach().float().cpu().clamp(-1, 1) * 0.5 + 0.5), step)
        else:
            import numpy as np
            from PIL import Image

            with Image.open(picture) as png:
                pixels = np.asarray(png.convert("RGB"))  # (H, W, 3) uint8
            self._writer.add_image(tag, pixels, step, dataformats="HWC")
        self._writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def progress(total: int | None, desc: str, initial: int = 0, enabled: bool = True, unit: str = "step"):
    """The tqdm bar every long loop shows (off on non-main ranks)."""
    return tqdm(
        total=total,
        desc=desc,
        initial=initial,
        disable=not enabled,
        unit=unit,
        dynamic_ncols=True,
        file=sys.stderr,
        smoothing=0.1,
    )
