"""`latentdiff train autoencoder`: learn the latent space (Rombach et al. 2022, §3.1).

One loop: lr, forward, loss, backward, clip, step, (discriminator step), EMA, log,
reconstruction grid, checkpoint. After training: measure the latent std on training data
(the prior trains on z / std) and evaluate PSNR (and LPIPS) on val.
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import torch

from latentdiff.core.ema import EMA
from latentdiff.core.faults import NonFiniteError
from latentdiff.core.flags import add_train_args
from latentdiff.core.image_metrics import psnr
from latentdiff.core.latent_space import LatentSpace
from latentdiff.core.logger import save_grid
from latentdiff.core.pixels import from_uint8_to
from latentdiff.core.runs import follow, record_path
from latentdiff.core.runtime import unwrap
from latentdiff.core.sharding import full_module, plain_tensor, shard_model
from latentdiff.core.train import Run, make_optimizer, stage_main
from latentdiff.data.reader import make_loader, read_info, read_once
from latentdiff.decoder.losses import begin_with_gan, discriminator_backward, log_reconstruction_step
from latentdiff.decoder.perceptual import lpips_distance

from .load import encoder_hash
from .losses import AutoencoderLoss
from .model import Autoencoder, AutoencoderConfig

PRESETS = Path(__file__).parent
# What a resume on other data (--new-data) changes besides the weights, said when it is refused and when it starts.
NEW_DATA = (
    "; the latent scale is re-measured on it at the end, so priors and decoders trained on this autoencoder "
    "will not match its newest checkpoint (they keep reading the checkpoint they were trained with, pinned)"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latentdiff train autoencoder", description="Train the KL autoencoder that defines the latent space."
    )
    add_train_args(p, "autoencoder", presets=PRESETS)
    p.add_argument(
        "--perceptual",
        choices=["lpips", "none"],
        help="LPIPS perceptual loss (needs VGG16 weights in the torch hub cache) or none",
    )
    return p


@torch.no_grad()
def measure_latents(model: Autoencoder, batches, n_batches: int, device: torch.device) -> tuple[float, float]:
    """(std, max |z| / std) of z ~ q(z|x) over training images.

    The prior trains on z / std, unit variance (LDM §4.3.2); the scaled range is where the
    samplers clip their predicted z_0.
    """
    zs = [
        model.encode(from_uint8_to(batch["image"], device)).sample().double().flatten()
        for batch in itertools.islice(batches, n_batches)
    ]
    z = torch.cat(zs)
    std = z.std().item()
    if not (math.isfinite(std) and std > 0):
        raise NonFiniteError(
            f"the measured latent std is {std}: the autoencoder's weights or data are broken, "
            "and no prior can train on this latent space; retrain it (a lower train.lr)"
        )
    return std, z.abs().max().item() / std


@torch.no_grad()
def evaluate_reconstruction(
    model: Autoencoder, data: str, cfg: AutoencoderConfig, device: torch.device, lpips_model=None
) -> tuple[dict[str, float], torch.Tensor]:
    """Mean PSNR (and LPIPS) of posterior-mode reconstructions over up to cfg.eval_images val images."""
    loader = read_once(data, "val", cfg.train.batch_size, cfg.resolution, device=device)
    psnrs, lpipss, shown = [], [], None
    for batch in loader:
        x = from_uint8_to(batch["image"], device)
        x_hat = model.decode(model.encode(x).mode())
        psnrs.append(psnr(x_hat, x))
        if lpips_model is not None:
            lpipss.append(lpips_distance(lpips_model, x_hat.clamp(-1, 1), x))
        if shown is None:
            shown = torch.cat([x[:16], x_hat[:16]]).cpu()
        if sum(len(p) for p in psnrs) >= cfg.eval_images:
            break
    if not psnrs:
        raise ValueError(f"no validation images in {data}; the val split is empty")
    metrics = {"val_psnr": torch.cat(psnrs).mean().item(), "val_images": sum(len(p) for p in psnrs)}
    if lpipss:
        metrics["val_lpips"] = torch.cat(lpipss).mean().item()
    return metrics, shown


def train(args: argparse.Namespace) -> dict:
    if args.perceptual:
        args.set = [*args.set, f'loss.perceptual="{args.perceptual}"']
    # A new run trains at the dataset's resolution (info.json) unless --set resolution=N says otherwise.
    derive = follow(args, "resolution", lambda: read_info(args.data).get("resolution"))
    run = Run.start(args, AutoencoderConfig, PRESETS, stage="autoencoder", derive=derive, new_data_note=NEW_DATA)
    cfg, rt = run.config, run.runtime
    tcfg = cfg.train

    model = Autoencoder(cfg.model).to(rt.device)
    loss_fn = AutoencoderLoss(cfg.loss, cfg.model.in_channels, average=rt.all_reduce_mean).to(rt.device)
    ema = EMA(model, tcfg.ema_decay, tcfg.ema_warmup)
    # fsdp: in place, before the optimizer takes the parameters. The PatchGAN (a few % of the
    # autoencoder's weights) stays replicated: sharding it would save little and gather it twice a step.
    shard_model(model, rt, tcfg.parallel, ema)
    opt = make_optimizer(model.parameters(), tcfg)
    # The latent space is measured after training: until then later stages cannot use the run.
    meta = {"data": record_path(args.data, run.path), "latent_space": None}
    scheduler, opt_d = begin_with_gan(run, loss_fn, model, opt, ema, meta)
    net = run.wrap(model)

    # Same seed, same order: a resumed run skips the batches it has already seen.
    loader = make_loader(
        args.data,
        "train",
        tcfg.batch_size,
        seed=tcfg.seed,
        num_workers=tcfg.num_workers,
        resolution=cfg.resolution,
        device=rt.device,
    )
    batches = run.batches(loader)
    for step in run.steps():
        batch = next(batches)
        x = from_uint8_to(batch["image"], rt.device)  # (B, 3, H, W) in [-1, 1]
        lr = scheduler.get_last_lr()[0]
        with rt.autocast():
            x_hat, posterior = net(x)
            x_hat = x_hat.float()
            terms = loss_fn(x, x_hat, posterior, step, unwrap(net).decoder.last_layer)  # per sample (B,)
        loss = terms["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = plain_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip or math.inf))
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
        ema.update(model)

        log_reconstruction_step(run, step, tcfg.log_every, tcfg.sample_every, terms, x, x_hat, lr, grad_norm)
        if run.every(tcfg.ckpt_every, step):
            run.checkpoint(step + 1)

    # Final: latent scale from training data, then validation figures, on the EMA weights if kept.
    final = full_module(ema.final(model))  # sharded (fsdp): gathered on every rank, a plain copy
    scale_batches = make_loader(
        args.data,
        "train",
        tcfg.batch_size,
        seed=tcfg.seed + 1,
        rank=0,
        world_size=1,
        resolution=cfg.resolution,
        device=rt.device,
    )
    with rt.fork_rng():  # the checkpoint below keeps the RNG state where training left it, for --resume
        std, absmax = measure_latents(final, iter(scale_batches), cfg.scale_batches, rt.device)
    space = LatentSpace(
        scale=1.0 / std,
        absmax=absmax,
        channels=cfg.model.latent_channels,
        downsampling=cfg.model.downsampling,
        resolution=cfg.resolution,
        encoder_hash=encoder_hash(final),
    )
    run.checkpoint(run.done, meta={"latent_std": std, "latent_space": space.to_dict()})
    summary = {"latent_std": std, "scale_factor": 1.0 / std}
    if rt.is_main:
        metrics, shown = evaluate_reconstruction(final, args.data, cfg, rt.device, loss_fn.lpips)
        grid = save_grid(shown, run.path / "reconstructions.png", 16)
        run.image("reconstructions", run.done, grid)
        summary.update(metrics)
        summary["reconstruction_grid"] = str(grid)
    return run.finish(summary)


def main(argv: list[str] | None = None) -> dict:
    return stage_main(build_parser, train, argv)


if __name__ == "__main__":
    main()
