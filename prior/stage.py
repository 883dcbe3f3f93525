"""`latentdiff train prior`: learn p(z | c) over the frozen autoencoder's scaled latents.

The simplified objective of DDPM (Ho et al. 2020, eq. 14, Alg. 1), in latent space
(Rombach et al. 2022, eq. 2), with the target and weighting the config names:
    z_0 = E(x) * scale,  t ~ U{0..T-1},  eps ~ N(0, I),
    z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps          (eq. 4, q(z_t | z_0))
    L   = w(t) || f(z_t, t, c) - target(z_0, eps, t) ||^2
Captions are dropped to "" with probability caption_dropout, so the same network also
learns the unconditional model that classifier-free guidance needs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from latentdiff.core.checkpoint import read_meta
from latentdiff.core.ema import EMA
from latentdiff.core.latent_space import LatentSpace
from latentdiff.core.logger import save_grid
from latentdiff.core.runs import follow, record_path, recorded_data
from latentdiff.core.runtime import unwrap
from latentdiff.core.train import Run, add_train_args, make_optimizer, set_lr, stage_main
from latentdiff.data.captions import class_prompt
from latentdiff.data.reader import make_loader, read_info

from .config import PriorConfig, make_schedule
from .frozen_stages import check_prior_fits, check_recorded, load_frozen_stages, recorded_stages, stage_records
from .latent_cache import LatentCache
from .latent_sampling import clip_bound, sample_latents
from .losses import diffusion_loss
from .text_conditioning import guided_conditioning, text_conditioning
from .unet import UNet

PRESETS = Path(__file__).parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentdiff train prior",
                                description="Train the text-conditioned latent diffusion model (the prior).")
    add_train_args(p, "prior", presets=PRESETS)
    p.add_argument("--autoencoder", help="run directory of `latentdiff train autoencoder` (frozen)")
    p.add_argument("--text", help="run directory of `latentdiff train text`, or openclip:MODEL:PRETRAINED (frozen)")
    p.add_argument("--cache-latents", action="store_true",
                   help="encode the training set once (posterior moments, run_dir/latent_cache) and train from it")
    return p


def default_prompts(data: str, n: int = 8) -> list[str]:
    """The dataset's class prompts, or the first val captions, for training-time sample grids."""
    info = read_info(data)
    if info.get("classes"):
        return [class_prompt(c) for c in info["classes"]]
    loader = make_loader(data, "val", n, shuffle=False, repeat=False, drop_last=False, rank=0, world_size=1)
    batch = next(iter(loader), None)
    return list(batch["caption"]) if batch else ["a photo"]


def drop_captions(captions: list[str], p: float) -> list[str]:
    """Replace each caption by "" with probability p (global RNG: seeded and restored on resume)."""
    if p <= 0:
        return list(captions)
    keep = torch.rand(len(captions)) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


@torch.no_grad()
def batch_latents(batch: dict, ae, space: LatentSpace, cached: bool, device: torch.device) -> torch.Tensor:
    """The prior's z_0 (scaled z ~ q(z|x)) for a batch: from cached posterior moments, or by encoding its images."""
    if cached:
        return space.to_prior(LatentCache.sample(batch, device))
    return space.to_prior(ae.encode(batch["image"].to(device, non_blocking=True)).sample())


def train_step(net: torch.nn.Module, opt: torch.optim.Optimizer, schedule, cfg: PriorConfig, encoder,
               z0: torch.Tensor, captions: list[str], rt) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on the objective above (Alg. 1); returns (loss, grad norm) as tensors.

    The loop around it sets the learning rate and updates the EMA; benchmarks time it alone.
    """
    with torch.no_grad():
        states, mask, pooled = text_conditioning(encoder, drop_captions(captions, cfg.caption_dropout))
    B = z0.shape[0]
    t = torch.randint(0, schedule.T, (B,), device=z0.device)
    eps = torch.randn_like(z0)
    z_t = schedule.q_sample(z0, t, eps)
    target = schedule.target(cfg.diffusion.prediction, z0, eps, t)
    with rt.autocast():
        out = net(z_t, t.float(), states, mask, pooled)
    loss = diffusion_loss(out, target, t, schedule, cfg.diffusion.loss_weighting, cfg.diffusion.min_snr_gamma,
                          cfg.diffusion.prediction).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    opt.step()
    return loss.detach(), grad_norm


@torch.no_grad()
def sample_grid(unet, schedule, cfg: PriorConfig, encoder, ae, space: LatentSpace, clip_x0, prompts,
                path: Path, seed: int = 0) -> Path:
    prompts = [p for p in prompts for _ in range(cfg.sampling.per_prompt)]
    cond, uncond = guided_conditioning(encoder, prompts, [""] * len(prompts))
    g = torch.Generator(cond[0].device).manual_seed(seed)
    z0 = sample_latents(unet, schedule, cfg.diffusion.prediction, cond, uncond, space.latent_shape,
                        sampler=cfg.sampling.sampler, steps=cfg.sampling.steps, guidance=cfg.sampling.guidance,
                        generator=g, clip_x0=clip_x0)
    images = ae.decode(space.to_decoder(z0))
    return save_grid(images, path, nrow=cfg.sampling.per_prompt * (2 if len(prompts) > 16 else 1))


def train(args: argparse.Namespace) -> dict:
    run_meta = None
    if args.resume:
        run_meta = read_meta(args.resume, "prior")
        args.autoencoder, args.text = recorded_stages(run_meta, args.resume, args.autoencoder, args.text)
        args.data = args.data or recorded_data(args.resume, "prior")
        # The resumed run reads its data the way it started: the cache's order is not the shards'.
        args.cache_latents = args.cache_latents or bool(run_meta.get("cache_latents", False))
    for flag in ("data", "autoencoder", "text"):
        if not getattr(args, flag):
            raise ValueError(f"--{flag} is required for `latentdiff train prior`")
    # A new prior makes images at its autoencoder's resolution unless --set resolution=N says otherwise
    # (and then check_prior_fits refuses a disagreement).
    recorded = read_meta(args.autoencoder, "autoencoder").get("latent_space") or {}
    run = Run.start(args, PriorConfig, PRESETS, stage="prior",
                    derive=follow(args, "resolution", recorded.get("resolution")))
    cfg, rt = run.config, run.runtime
    tcfg = cfg.train
    stages = load_frozen_stages(args.autoencoder, args.text, rt.device)
    if run_meta is not None:
        check_recorded(stages, run_meta, run.path)
    check_prior_fits(cfg, stages, f"prior preset {args.preset}" if run_meta is None else str(run.path))
    ae, space, encoder = stages.autoencoder, stages.latent_space, stages.text
    schedule = make_schedule(cfg.diffusion)
    clip_x0 = clip_bound(cfg.diffusion, space)
    meta = {**stage_records(stages, run.path), "data": record_path(args.data, run.path),
            "cache_latents": bool(args.cache_latents)}

    unet = UNet(cfg.model).to(rt.device)
    opt = make_optimizer(unet.parameters(), tcfg)
    ema = EMA(unet, tcfg.ema_decay, tcfg.ema_warmup)
    start, _ = run.restore({"model": unet}, {"model": opt}, ema)
    net = rt.wrap(unet)
    prompts = list(cfg.sampling.prompts) or default_prompts(args.data)

    if args.cache_latents:
        with rt.fork_rng():  # encoding happens on a fresh run only; keep the RNG as a resumed run has it
            cache = LatentCache.build(ae, args.data, run.path / "latent_cache", space.resolution, rt)
        loader = cache.loader(tcfg.batch_size, seed=tcfg.seed, rank=rt.rank, world_size=rt.world_size)
    else:
        loader = make_loader(args.data, "train", tcfg.batch_size, seed=tcfg.seed, num_workers=tcfg.num_workers,
                             resolution=space.resolution)
    # Same seed, same order: a resumed run skips the batches it has already seen.
    batches = run.batches(loader, start)
    done = start
    for step in run.steps(start):
        batch = next(batches)
        lr = run.lr(step)
        set_lr(opt, lr)
        z0 = batch_latents(batch, ae, space, args.cache_latents, rt.device)
        loss, grad_norm = train_step(net, opt, schedule, cfg, encoder, z0, batch["caption"], rt)
        ema.update(unet)
        run.count_images(z0.shape[0], batch.get("skipped", 0))

        if run.every(tcfg.log_every, step):
            run.log(step, {"loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item()})
        if run.every(tcfg.sample_every, step) and rt.is_main:
            sample_grid(ema.module if ema.enabled else unwrap(unet), schedule, cfg, encoder, ae, space, clip_x0,
                        prompts, run.path / "samples" / f"step_{step + 1:07d}.png", seed=tcfg.seed)
        if run.every(tcfg.ckpt_every, step):
            run.save(step + 1, {"model": unet}, {"model": opt}, ema, meta=meta)
        done = step + 1

    run.save(done, {"model": unet}, {"model": opt}, ema, meta=meta)
    summary = {"steps": done}
    if rt.is_main:
        final = ema.final(unet)
        grid = sample_grid(final, schedule, cfg, encoder, ae, space, clip_x0, prompts,
                           run.path / "samples.png", seed=tcfg.seed)
        summary["sample_grid"] = str(grid)
    return run.finish(summary)


def main(argv: list[str] | None = None) -> dict:
    return stage_main(build_parser, train, argv)


if __name__ == "__main__":
    main()
