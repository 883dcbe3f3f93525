"""Data: shard loading images/s with 0 and 2 workers, against what the training stages consume.

The loader is timed alone (reading the webdataset shards, decoding PNGs, resizing, collating)
from its second batch on; its start-up (opening shards, starting workers) is reported apart.
Consumption is measured here too, on the same batch sizes: the prior stage's step encoding
images on the fly and the autoencoder stage's step (their presets' batch sizes). The loader
must deliver at least 3x what a stage consumes, or it would be the bottleneck.
"""

from __future__ import annotations

import time

from latentdiff.core.runtime import Runtime
from latentdiff.data.reader import make_loader

from .common import bench_data, parser, report, table, time_it, tiny_autoencoder, tiny_prior_config, tiny_text_encoder
from .latent_vs_pixel import Inputs, step_seconds
from .model_step import autoencoder_step


def loader_rate(data: str, workers: int, batch_size: int, batches: int, resolution: int) -> tuple[float, float]:
    """(images/s after the first batch, seconds to the first batch)."""
    loader = make_loader(data, "train", batch_size, seed=0, num_workers=workers, resolution=resolution)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    n = sum(len(next(it)["caption"]) for _ in range(batches))
    return n / (time.perf_counter() - t1), startup


def main(argv: list[str] | None = None) -> dict:
    p = parser("data_loading", __doc__, data=True)
    p.add_argument("--batches", type=int, default=40, help="timed batches of 128 per loader (default: %(default)s)")
    args = p.parse_args(argv)
    data = bench_data(args.data)
    cfg = tiny_prior_config()

    loaders = {}
    for workers in (0, 2):
        loaders[workers] = loader_rate(data, workers, 128, args.batches, cfg.resolution)
        print(f"{workers} workers: {loaders[workers][0]:.0f} images/s", flush=True)

    rt = Runtime.setup(0, "auto")
    ae, _ = tiny_autoencoder(rt.device)
    ae.eval().requires_grad_(False)
    batch = next(iter(make_loader(data, "train", cfg.train.batch_size, seed=0, resolution=cfg.resolution)))
    prior_s, _ = step_seconds(cfg, ae.cfg.latent_channels, Inputs(batch, ae), tiny_text_encoder(rt.device), rt, 3)
    _, ae_step, ae_batch = autoencoder_step("tiny", "sdpa", "fp32", rt.device)
    ae_s = time_it(ae_step, warmup=2, repeats=10)
    consumers = {
        f"prior stage (batch {cfg.train.batch_size}, encoding on the fly)": cfg.train.batch_size / prior_s,
        f"autoencoder stage (batch {ae_batch})": ae_batch / ae_s,
    }

    rows = []
    for workers, (rate, startup) in loaders.items():
        ratios = ", ".join(f"{rate / need:.1f}x {name.split(' (')[0]}" for name, need in consumers.items())
        rows.append([f"loader, {workers} workers", f"{rate:.0f}", f"{startup:.2f}", ratios])
    for name, need in consumers.items():
        rows.append([name, f"{need:.0f}", "", "consumes"])
    text = table(["", "images/s", "start-up s", "loader / consumption"], rows)
    worst = min(rate for rate, _ in loaders.values()) / max(consumers.values())
    text += (
        f"\n\n{data}, 32x32 PNGs in webdataset shards, batches of 128, {args.batches} timed batches. "
        f"Slowest loader over the hungriest stage: **{worst:.1f}x** (target >= 3x). With workers the "
        "loader shares the same 2 cores as training, so the 0-worker figure is the one training sees here."
    )
    figures = {
        "data": data,
        "loader_images_per_s": {str(w): r for w, (r, _) in loaders.items()},
        "loader_startup_s": {str(w): s for w, (_, s) in loaders.items()},
        "consumption_images_per_s": consumers,
        "worst_ratio": worst,
    }
    report("data_loading", "3. Data loading against consumption", text, figures, args.out)
    return figures


if __name__ == "__main__":
    main()
