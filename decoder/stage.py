"""`latentdiff train decoder`: train the decoder alone, the encoder (and so the latent space) frozen.

As Stable Diffusion's fine-tuned VAE decoders did: a prior trained on these latents stays
valid, because the encoder never changes. With `upscale = 2` the decoder maps the same
latents to images at twice the resolution, learning from shards at the higher resolution
while the encoder sees them downsampled.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from latentdiff.autoencoder.load import load_autoencoder, read_autoencoder_config
from latentdiff.core.config import PositiveInt
from latentdiff.core.ema import EMA
from latentdiff.core.flags import add_train_args
from latentdiff.core.image_metrics import psnr
from latentdiff.core.logger import save_grid
from latentdiff.core.pixels import from_uint8_to
from latentdiff.core.runs import find_recorded, pinned_source, record_path
from latentdiff.core.runtime import unwrap
from latentdiff.core.train import Run, TrainConfig, make_optimizer, stage_main
from latentdiff.data.reader import make_loader, read_once

from .losses import (
    DecoderLoss,
    DecoderLossConfig,
    begin_with_gan,
    discriminator_backward,
    log_reconstruction_step,
)
from .network import Decoder, DecoderConfig

PRESETS = Path(__file__).parent


@dataclass(frozen=True)
class DecoderStageConfig:
    upscale: Literal[1, 2, 4] = 1  # output side / the autoencoder's input side: 1 (fine-tune) or 2, 4 (super-resolve)
    # The network: filled from the autoencoder's decoder (and `upscale`) when a run starts, so that
    # config.toml alone rebuilds it; presets leave it out.
    model: DecoderConfig = field(default_factory=DecoderConfig)
    init_from_autoencoder: bool = True  # start from the autoencoder's decoder weights (the shared layers)
    loss: DecoderLossConfig = field(default_factory=DecoderLossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_images: PositiveInt = 2000  # validation images for the final figures


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latentdiff train decoder", description="Train the decoder alone with the autoencoder's encoder frozen."
    )
    add_train_args(p, "decoder", presets=PRESETS)
    p.add_argument("--autoencoder", help="run directory of `latentdiff train autoencoder` (its encoder is frozen)")
    p.add_argument("--upscale", type=int, choices=[1, 2, 4], help="decode to this many times the resolution")
    return p


def downsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """What the encoder sees of a high-resolution image: area-averaged to its own resolution."""
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="area")


@torch.no_grad()
def evaluate(ae, decoder: Decoder, data: str, res: int, upscale: int, eval_images: int, device) -> dict:
    """Val PSNR of this decoder against the autoencoder's own decoder (bicubically upsampled when upscale > 1)."""
    loader = read_once(data, "val", 100, res * upscale, device=device)
    ours, base, n, shown = [], [], 0, None
    for batch in loader:
        x = from_uint8_to(batch["image"], device)
        z = ae.encode(downsample(x, res)).mode()
        x_new = decoder(z)
        x_old = ae.decode(z)
        if upscale > 1:
            x_old = F.interpolate(x_old, scale_factor=upscale, mode="bicubic", align_corners=False)
        ours.append(psnr(x_new, x))
        base.append(psnr(x_old, x))
        if shown is None:
            shown = torch.cat([x[:8], x_old[:8].clamp(-1, 1), x_new[:8].clamp(-1, 1)]).cpu()
        n += x.shape[0]
        if n >= eval_images:
            break
    baseline = "val_psnr_original_decoder" if upscale == 1 else "val_psnr_bicubic_original_decoder"
    return {"val_psnr": torch.cat(ours).mean().item(), baseline: torch.cat(base).mean().item(), "val_images": n}, shown


# Flags a resume reads back from the run when left out (only a local path is taken from its records).
FROM_RUN = {
    "autoencoder": lambda meta, run: pinned_source(
        find_recorded(meta["autoencoder"], run, "its autoencoder", "--autoencoder"), run
    )
}


def train(args: argparse.Namespace) -> dict:
    if args.upscale:
        args.set = [*args.set, f"upscale={args.upscale}"]
    # A new run takes its network from the autoencoder's decoder, so config.toml alone rebuilds it.
    run = Run.start(
        args,
        DecoderStageConfig,
        PRESETS,
        stage="decoder",
        from_run=FROM_RUN,
        required=("data", "autoencoder"),
        derive=lambda cfg: replace(
            cfg, model=replace(read_autoencoder_config(args.autoencoder).model.decoder_config(), upscale=cfg.upscale)
        ),
    )
    cfg, rt = run.config, run.runtime
    tcfg = cfg.train
    ae, space = load_autoencoder(args.autoencoder, rt.device)
    if run.recorded is not None and run.recorded["encoder_hash"] != space.encoder_hash:
        raise ValueError(
            f"{args.autoencoder} is not the autoencoder this decoder run was started from "
            f"(encoder hash {space.encoder_hash} != {run.recorded['encoder_hash']})"
        )
    res = space.resolution
    dec_cfg = cfg.model
    decoder = Decoder(dec_cfg).to(rt.device)
    if cfg.init_from_autoencoder and not run.resuming:
        # upscale levels are new; every other tensor has the autoencoder decoder's name and shape
        missing, unexpected = decoder.load_state_dict(ae.decoder.state_dict(), strict=False)
        assert not unexpected, unexpected
        # The new upsampling convs start as the identity (their ResBlocks already do, zero-init),
        # so an upscaling decoder starts as nearest-neighbour upsampling of the original's features.
        for upsample, _ in decoder.extra:
            torch.nn.init.dirac_(upsample.conv.weight)
            torch.nn.init.zeros_(upsample.conv.bias)
    loss_fn = DecoderLoss(cfg.loss, dec_cfg.out_channels, average=rt.all_reduce_mean).to(rt.device)
    opt = make_optimizer(decoder.parameters(), tcfg)
    ema = EMA(decoder, tcfg.ema_decay, tcfg.ema_warmup)
    meta = {
        "autoencoder": record_path(args.autoencoder, run.path),
        "encoder_hash": space.encoder_hash,
        "upscale": cfg.upscale,
        "resolution": res * cfg.upscale,
        "data": record_path(args.data, run.path),
    }
    scheduler, opt_d = begin_with_gan(run, loss_fn, decoder, opt, ema, meta)
    net = run.wrap(decoder)

    loader = make_loader(
        args.data,
        "train",
        tcfg.batch_size,
        seed=tcfg.seed,
        num_workers=tcfg.num_workers,
        resolution=res * cfg.upscale,
        device=rt.device,
    )
    batches = run.batches(loader)  # a resumed run skips what it has seen
    for step in run.steps():
        batch = next(batches)
        x = from_uint8_to(batch["image"], rt.device)  # (B, 3, H, W) in [-1, 1]
        with torch.no_grad():
            z = ae.encode(downsample(x, res)).sample()
        lr = scheduler.get_last_lr()[0]
        with rt.autocast():
            x_hat = net(z).float()
            terms = loss_fn(x, x_hat, step, unwrap(decoder).last_layer)  # per sample (B,)
        loss = terms["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(decoder.parameters(), tcfg.grad_clip or math.inf)
        gan = {}
        if loss_fn.gan_active(step):  # the PatchGAN's gradients before either step: one finiteness vote for both
            gan["discriminator"] = discriminator_backward(loss_fn, opt_d, x, x_hat, run)
        finite = run.finite_parts(step, {"model": (loss, grad_norm), **gan})  # the step's one wait for the device
        if finite["model"]:
            opt.step()
        if gan:
            if finite["discriminator"]:
                opt_d.step()
            terms["disc"] = gan["discriminator"][0].expand(x.shape[0])
        run.advance(x.shape[0], batch["skipped"])
        ema.update(decoder)

        log_reconstruction_step(run, step, tcfg.log_every, tcfg.sample_every, terms, x, x_hat, lr, grad_norm)
        if run.every(tcfg.ckpt_every, step):
            run.checkpoint(step + 1)

    summary = {}
    if rt.is_main:
        final = ema.final(decoder)
        metrics, shown = evaluate(ae, final, args.data, res, cfg.upscale, cfg.eval_images, rt.device)
        summary.update(metrics)
        summary["comparison_grid"] = str(save_grid(shown, run.path / "comparison.png", 8))
        run.image("comparison", run.done, summary["comparison_grid"])
    return run.finish(summary)


def main(argv: list[str] | None = None) -> dict:
    return stage_main(build_parser, train, argv)


if __name__ == "__main__":
    main()
