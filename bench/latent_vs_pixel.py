"""Latent vs pixel: prior training images/s of the tiny UNet on f=4 latents and on pixels.

The reason latent diffusion exists (Rombach et al. 2022, §3): the same UNet width over 8x8x4
latents instead of 32x32x3 pixels does 16x fewer positions per level, attention 256x cheaper.
Both rows time the prior stage's own `prior_loss` (text encoding, noise, forward, min-SNR loss)
and the loop's backward, clipping and AdamW step at the same batch on the same real batch; the latent row also
encodes the images with the autoencoder, as training without a latent cache does.
"""

from __future__ import annotations

import dataclasses

import torch

from latentdiff.core.pixels import from_uint8
from latentdiff.core.runtime import Runtime
from latentdiff.core.train import make_optimizer
from latentdiff.data.reader import make_loader
from latentdiff.prior.config import make_schedule
from latentdiff.prior.stage import batch_latents, prior_loss
from latentdiff.prior.unet import UNet

from .common import (
    bench_data,
    optimizer_step,
    parser,
    report,
    table,
    time_it,
    tiny_autoencoder,
    tiny_prior_config,
    tiny_text_encoder,
    untrained_latent_space,
)


def step_seconds(cfg, in_channels: int, make_z0, encoder, rt, repeats: int) -> tuple[float, int]:
    """Median seconds of one training step of a UNet with cfg's widths over make_z0()'s tensors."""
    model_cfg = dataclasses.replace(cfg.model, in_channels=in_channels)
    unet = UNet(model_cfg).to(rt.device)
    opt = make_optimizer(unet.parameters(), cfg.train)
    schedule = make_schedule(cfg.diffusion)
    captions = make_z0.captions

    def step():
        loss = prior_loss(unet, schedule, cfg, encoder, make_z0(), captions, rt)[0].mean()
        optimizer_step(loss, unet, opt, cfg.train.grad_clip)

    return time_it(step, warmup=1, repeats=repeats, device=rt.device), sum(p.numel() for p in unet.parameters())


class Inputs:
    """z_0 for a step: the autoencoder's scaled latents of a batch (encoded each call), or its pixels.

    batch: a reader batch, its uint8 images on the device already or not; both rows convert them each call.
    """

    def __init__(self, batch: dict, ae=None):
        self.images, self.captions, self.ae = batch["image"], list(batch["caption"]), ae

    def __call__(self) -> torch.Tensor:
        if self.ae is None:
            return from_uint8(self.images)  # (B, 3, H, W) in [-1, 1]: pixel diffusion's z_0
        space = untrained_latent_space(self.ae, self.images.shape[-1])
        return batch_latents({"image": self.images}, self.ae, space, False, self.images.device)


def main(argv: list[str] | None = None) -> dict:
    p = parser("latent_vs_pixel", __doc__, data=True)
    p.add_argument("--batch-size", type=int, default=128, help="images per step, both rows (default: %(default)s)")
    p.add_argument(
        "--repeats", type=int, default=10, help="timed latent steps after one warm-up (default: %(default)s)"
    )
    p.add_argument("--pixel-repeats", type=int, default=2, help="timed pixel steps (~20 s each here)")
    args = p.parse_args(argv)

    cfg = tiny_prior_config()
    rt = Runtime.setup(0, "auto")
    ae, _ = tiny_autoencoder(rt.device)
    ae.eval().requires_grad_(False)
    encoder = tiny_text_encoder(rt.device)
    batch = next(iter(make_loader(bench_data(args.data), "train", args.batch_size, seed=0, resolution=cfg.resolution)))
    batch["image"] = batch["image"].to(rt.device)  # uint8: both rows convert on the device

    latent_s, n_latent = step_seconds(cfg, ae.cfg.latent_channels, Inputs(batch, ae), encoder, rt, args.repeats)
    pixel_s, n_pixel = step_seconds(cfg, 3, Inputs(batch), encoder, rt, args.pixel_repeats)
    B = args.batch_size
    f = ae.cfg.downsampling
    side = cfg.resolution
    rows = [
        [
            f"latent {side // f}x{side // f}x{ae.cfg.latent_channels} (f={f}, encoded on the fly)",
            f"{n_latent / 1e6:.2f}M",
            f"{latent_s:.3f}",
            f"{B / latent_s:.0f}",
            "1.0x",
        ],
        [
            f"pixel {side}x{side}x3",
            f"{n_pixel / 1e6:.2f}M",
            f"{pixel_s:.3f}",
            f"{B / pixel_s:.1f}",
            f"{pixel_s / latent_s:.1f}x slower",
        ],
    ]
    text = table(["UNet input", "params", "s/step", "images/s", "vs latent"], rows)
    text += (
        f"\n\nTiny prior UNet (channels {list(cfg.model.channels)}, attention at levels "
        f"{list(cfg.model.attention_levels)}), batch {B}, fwd+bwd+AdamW, "
        f"median of {args.repeats} (latent) and {args.pixel_repeats} (pixel) steps. "
        f"Latent speed-up: **{pixel_s / latent_s:.1f}x** (target >= 10x)."
    )
    figures = {
        "batch_size": B,
        "latent_s_per_step": latent_s,
        "pixel_s_per_step": pixel_s,
        "latent_images_per_s": B / latent_s,
        "pixel_images_per_s": B / pixel_s,
        "speedup": pixel_s / latent_s,
        "latent_params": n_latent,
        "pixel_params": n_pixel,
    }
    report("latent_vs_pixel", "1. Latent vs pixel diffusion: prior training speed", text, figures, args.out)
    return figures


if __name__ == "__main__":
    main()
