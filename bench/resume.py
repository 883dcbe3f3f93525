"""Resume start-up: seconds from `Run.batches(loader, step)` to the first batch of a resumed run, at a late step.

Before: the loader replays and decodes every batch up to the saved step (what a checkpoint
without stream positions still gets). After: each worker restarts at the position the
checkpoint recorded, reading (not decoding) only the rest of its epoch. Both must give the
same next batch; the table says whether they did.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from latentdiff.core.runtime import Runtime
from latentdiff.core.train import Run, TrainConfig
from latentdiff.data.reader import make_loader

from .common import bench_data, parser, report, table


@dataclass(frozen=True)
class _Config:
    train: TrainConfig


def first_batch_after(run: Run, loader, step: int) -> tuple[float, dict]:
    """(seconds to the first batch from `step` on, that batch)."""
    t0 = time.perf_counter()
    batch = next(run.batches(loader, step))
    return time.perf_counter() - t0, batch


def main(argv: list[str] | None = None) -> dict:
    p = parser("resume", __doc__, data=True)
    p.add_argument("--step", type=int, default=400, help="the saved step to resume at (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="per step (default: %(default)s, the tiny presets')")
    args = p.parse_args(argv)
    data = bench_data(args.data)
    loader = make_loader(data, "train", args.batch_size, seed=0, resolution=32)
    rt = Runtime(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        config = _Config(TrainConfig(batch_size=args.batch_size))
        before = Run(Path(tmp), "bench", config, rt, resuming=True)
        before_s, replayed = first_batch_after(before, loader, args.step)  # no recorded positions: replay
        # The positions a checkpoint at `step` records are those of the batches before it.
        again = Run(Path(tmp), "bench", config, rt, resuming=True)
        it = again.batches(loader, 0)
        for _ in range(args.step):
            next(it)
        saved = again._data_state()
        after = Run(Path(tmp), "bench", config, rt, resuming=True)
        after._data_position = saved
        after_s, resumed = first_batch_after(after, loader, args.step)
        fresh_s, _ = first_batch_after(Run(Path(tmp), "bench", config, rt, resuming=False), loader, 0)
    same = replayed["key"] == resumed["key"] and torch.equal(replayed["image"], resumed["image"])
    images = args.step * args.batch_size
    rows = [
        ["before: replay and decode", f"{before_s:.2f}", f"{images / before_s:.0f}"],
        ["after: recorded positions", f"{after_s:.2f}", f"{images / after_s:.0f}"],
        ["(a fresh run's first batch)", f"{fresh_s:.2f}", ""],
    ]
    text = table(["resume at step " + str(args.step), "start-up s", "images skipped/s"], rows)
    text += (
        f"\n\n{data}, batches of {args.batch_size} at 32x32, 0 workers: {images:,} images before the step. "
        f"Same first batch both ways: **{'yes' if same else 'NO'}**. Replay grows with the step; "
        "the positions path reads at most the rest of one epoch."
    )
    figures = {
        "data": data,
        "step": args.step,
        "batch_size": args.batch_size,
        "before_s": before_s,
        "after_s": after_s,
        "fresh_s": fresh_s,
        "same_batch": same,
    }
    report("resume", "7. Resume start-up at a late step", text, figures, args.out)
    if not same:
        raise SystemExit("bench.resume: the two resume paths gave different batches")
    return figures


if __name__ == "__main__":
    main()
