"""Latent cache: prior training images/s from cached latents against encoding on the fly.

`latentdiff train prior --cache-latents` encodes the training split once (posterior mean and
std per image) and then samples z ~ q(z|x) from those moments at every step; without it every
step reads and decodes PNGs and runs the encoder. Both rows time the stage's own loop body
(next batch, `batch_latents`, `prior_loss`, backward and step) over real batches; the cache's one-off build time
and the number of steps after which it has paid for itself are reported beside them.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from latentdiff.core.runtime import Runtime
from latentdiff.core.train import make_optimizer
from latentdiff.data.reader import make_loader
from latentdiff.prior.config import make_schedule
from latentdiff.prior.latent_cache import LatentCache
from latentdiff.prior.stage import batch_latents, prior_loss
from latentdiff.prior.unet import UNet

from .common import (
    bench_data,
    optimizer_step,
    parser,
    report,
    table,
    tiny_autoencoder,
    tiny_prior_config,
    tiny_text_encoder,
    untrained_latent_space,
)


def loop_rate(batches, cached: bool, ae, unet, opt, schedule, cfg, encoder, rt, steps: int) -> float:
    """Images/s of the training loop body over `steps` steps, after one warm-up step."""

    def one():
        batch = next(batches)
        z0 = batch_latents(batch, ae, untrained_latent_space(ae, cfg.resolution), cached, rt.device)
        loss = prior_loss(unet, schedule, cfg, encoder, z0, batch["caption"], rt)[0].mean()
        optimizer_step(loss, unet, opt, cfg.train.grad_clip)
        return z0.shape[0]

    one()
    t0 = time.perf_counter()
    n = sum(one() for _ in range(steps))
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    p = parser("latent_cache", __doc__, data=True)
    p.add_argument("--steps", type=int, default=20, help="timed training steps per row (default: %(default)s)")
    args = p.parse_args(argv)
    data = bench_data(args.data)
    cfg = tiny_prior_config()
    rt = Runtime.setup(0, "auto")
    ae, _ = tiny_autoencoder(rt.device)
    ae.eval().requires_grad_(False)
    encoder = tiny_text_encoder(rt.device)
    unet = UNet(cfg.model).to(rt.device)
    opt = make_optimizer(unet.parameters(), cfg.train)
    schedule = make_schedule(cfg.diffusion)
    B = cfg.train.batch_size

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache = LatentCache.build(ae, data, Path(tmp) / "latent_cache", cfg.resolution, rt)
        build_s = time.perf_counter() - t0
        n_cached = len(cache)
        cached_rate = loop_rate(cache.loader(B, seed=0), True, ae, unet, opt, schedule, cfg, encoder, rt, args.steps)
    loader = iter(make_loader(data, "train", B, seed=0, resolution=cfg.resolution))
    fly_rate = loop_rate(loader, False, ae, unet, opt, schedule, cfg, encoder, rt, args.steps)

    saved_per_step = B / fly_rate - B / cached_rate
    breakeven = build_s / saved_per_step if saved_per_step > 0 else float("inf")
    payoff = f"pays off after {breakeven:.0f} steps" if saved_per_step > 0 else "never pays off here (no faster)"
    rows = [
        ["encode on the fly", f"{fly_rate:.0f}", "1.00x", ""],
        [
            "cached latents",
            f"{cached_rate:.0f}",
            f"{cached_rate / fly_rate:.2f}x",
            f"{build_s:.0f} s to encode {n_cached:,} images; {payoff}",
        ],
    ]
    text = table(["prior training", "images/s", "speed-up", "cache cost"], rows)
    text += (
        f"\n\nTiny prior preset, batch {B}, {args.steps} timed steps per row (data reading, encoding or "
        f"sampling from the moments, text encoding, fwd+bwd+AdamW), {data}."
    )
    figures = {
        "data": data,
        "batch_size": B,
        "on_the_fly_images_per_s": fly_rate,
        "cached_images_per_s": cached_rate,
        "speedup": cached_rate / fly_rate,
        "cache_build_s": build_s,
        "cached_images": n_cached,
        "breakeven_steps": breakeven if saved_per_step > 0 else None,
    }
    report("latent_cache", "4. Latent cache: prior training speed", text, figures, args.out)
    return figures


if __name__ == "__main__":
    main()
