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


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save (B, C, H, W) images in [-1, 1] as one PNG grid."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = images.detach().float().cpu().clamp(-1, 1) * 0.5 + 0.5
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    save_image(images, path, nrow=nrow, padding=1, pad_value=1.0)
    return path


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> uint8 in [0, 255], rounding the way PNG writers do."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] (any shape) -> float32 in [-1, 1], x / 127.5 - 1; to_uint8 inverts it exactly."""
    if images.dtype != torch.uint8:
        raise TypeError(f"from_uint8 expects uint8 pixels, got {images.dtype}")
    return images.float().div_(127.5).sub_(1.0)  # .float() copies, so the in-place ops never touch the input


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

    def image(self, tag: str, step: int, images: torch.Tensor) -> None:
        if self._writer is not None:
            from torchvision.utils import make_grid

            grid = make_grid(images.detach().float().cpu().clamp(-1, 1) * 0.5 + 0.5)
            self._writer.add_image(tag, grid, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def progress(total: int | None, desc: str, initial: int = 0, enabled: bool = True, unit: str = "step"):
    """The tqdm bar every long loop shows (off on non-main ranks)."""
    return tqdm(total=total, desc=desc, initial=initial, disable=not enabled, unit=unit,
                dynamic_ncols=True, file=sys.stderr, smoothing=0.1)
