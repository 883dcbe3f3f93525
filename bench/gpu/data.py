"""bench.gpu section 4: data loading at 256 px from JPEG shards, against what section 2's step consumes.

The shards are made here, in the section's work folder: procedural shapes drawn at a quarter of
the resolution, upscaled, with Gaussian noise (std 8 of 255) so that JPEG (quality 90) has
photo-like detail to code, not flat colour; the mean file size is reported beside the figure,
since decoding time grows with it. The loader is the one
every stage uses (`make_loader`), with the prior preset's batch size and `train.num_workers`,
timed from its second batch on; its start-up (opening shards, starting workers) is apart.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .plan import GOAL_DATA_RATIO, Sizes

NOISE_STD = 8.0  # of 255: sensor-like detail, so the JPEGs are not flat colour


def write_jpeg_shards(out: Path, n: int, resolution: int, shards: int = 8) -> float:
    """n captioned JPEGs as webdataset train shards (and info.json) in `out`; returns the mean JPEG size, KB."""
    from latentdiff.data.shapes import generate_shapes
    from latentdiff.data.shards import Sample, write_info, write_split

    rng = np.random.default_rng(0)
    noise = rng.normal(0, NOISE_STD, (4, resolution, resolution, 3)).astype(np.float32)  # reused, rolled per image
    sizes: list[int] = []

    def samples():
        for i, s in enumerate(generate_shapes(n, seed=0, resolution=max(4, resolution // 4))):
            big = np.asarray(s.image.resize((resolution, resolution), Image.Resampling.BILINEAR), dtype=np.float32)
            pixels = np.clip(big + np.roll(noise[i % 4], i, axis=(0, 1)), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
            sizes.append(buffer.tell())
            yield Sample(s.key, buffer.getvalue(), s.caption, s.meta, image_ext="jpg")

    count = write_split(out, "train", samples(), maxcount=max(1, n // shards))
    write_info(out, "bench-gpu-jpeg", resolution, {"train": count})
    return sum(sizes) / len(sizes) / 1024


def loader_rate(
    data: Path, batch_size: int, workers: int, batches: int, resolution: int, device: torch.device
) -> tuple[float, float]:
    """(images/s from the second batch on, seconds to the first batch), each batch delivered to `device` as the
    stages take it: from pinned memory (the reader pins for an accelerator), uint8, converted there."""
    from latentdiff.core.pixels import from_uint8_to
    from latentdiff.data.reader import make_loader

    loader = make_loader(
        str(data), "train", batch_size, seed=0, num_workers=workers, resolution=resolution, device=device
    )
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += from_uint8_to(next(it)["image"], device).shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the last copies and conversions are part of the time
    return n / (time.perf_counter() - t1), startup


def run(sizes: Sizes, work: Path, record: Callable[[dict], None], earlier: dict) -> dict:
    """Section 4; `earlier` holds section 2's result (what the step consumes), when it ran."""
    from .speed import prior_config

    cfg = prior_config(sizes)
    batch, workers = cfg.train.batch_size, cfg.train.num_workers
    t0 = time.perf_counter()
    kb = write_jpeg_shards(work / "jpeg", sizes.data_n, sizes.data_resolution)
    made_s = time.perf_counter() - t0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU only in --cpu-smoke
    rate, startup = loader_rate(work / "jpeg", batch, workers, sizes.data_batches, sizes.data_resolution, device)
    consumed = (earlier.get("train_step") or {}).get("figures", {}).get("best_images_per_s")
    ratio = rate / consumed if consumed else None
    rows = [
        [f"loader, {workers} workers, batch {batch}", f"{rate:.0f}", f"{startup:.2f}",
         "n/a: section 2 gave no figure" if ratio is None else f"{ratio:.1f}x"],
        ["the training step (section 2, fastest variant)", "n/a" if consumed is None else f"{consumed:.0f}", "",
         "consumes"],
    ]  # fmt: skip
    return {
        "columns": ["", "images/s", "start-up s", "loader / step"],
        "rows": rows,
        "notes": [
            f"{sizes.data_n} JPEGs at {sizes.data_resolution} px (quality 90, mean {kb:.1f} KB; written in "
            f"{made_s:.0f} s) in 8 webdataset shards; `make_loader` with the {sizes.prior_preset} prior preset's "
            f"batch ({batch}) and `train.num_workers` ({workers}), {sizes.data_batches} timed batches: reading, "
            "JPEG decoding, collating, in this process and its workers, and the copy to the device (pinned, uint8) "
            "with its conversion there (the step was not running beside it)."
        ],
        "figures": {
            "images_per_s": rate,
            "startup_s": startup,
            "jpeg_kb": kb,
            "consumed_images_per_s": consumed,
            "ratio": ratio,
            "workers": workers,
            "batch_size": batch,
        },  # fmt: skip
        "goals": [
            (
                f"data loading >= {GOAL_DATA_RATIO:g}x what the step consumes",
                "n/a: no training-step figure" if ratio is None else f"{ratio:.1f}x ({rate:.0f} images/s)",
                None if ratio is None else ratio >= GOAL_DATA_RATIO,
            )
        ],
    }
