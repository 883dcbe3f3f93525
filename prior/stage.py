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
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from latentdiff.core.checkpoint import read_meta
from latentdiff.core.ema import EMA
from latentdiff.core.errors import UserError
from latentdiff.core.flags import add_train_args
from latentdiff.core.latent_space import LatentSpace
from latentdiff.core.pixels import from_uint8_to
from latentdiff.core.runs import follow, record_path
from latentdiff.core.runtime import unwrap
from latentdiff.core.sharding import full_module, plain_tensor, shard_model
from latentdiff.core.train import Run, make_optimizer, stage_main
from latentdiff.data.captions import class_prompt
from latentdiff.data.reader import make_loader, read_info, read_once

from .config import PriorConfig, make_schedule
from .frozen_stages import (
    SKIP,
    check_prior_fits,
    check_recorded,
    load_frozen_stages,
    recorded_stages,
    stage_records,
)
from .grounding import Grounding, check_grounding_data
from .init import InitSource, check_init_hash, init_config, init_source, load_prior
from .latent_cache import LatentCache
from .lora import Adapters, add_adapters, layers_from_adapters, lora_metadata, write_lora_file
from .losses import diffusion_loss
from .parameters import generate_command, save_settings_grid
from .pipeline import TextToImage
from .text_conditioning import text_conditioning
from .unet import UNet

PRESETS = Path(__file__).parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latentdiff train prior", description="Train the text-conditioned latent diffusion model (the prior)."
    )
    add_train_args(p, "prior", presets=PRESETS)
    p.add_argument("--autoencoder", help="run directory of `latentdiff train autoencoder` (frozen)")
    p.add_argument("--text", help="run directory of `latentdiff train text`, or openclip:MODEL:PRETRAINED (frozen)")
    p.add_argument(
        "--init",
        metavar="RUN",
        help="start from the weights of this prior run (trained here, imported, or a LoRA run's merged ones; its "
        "EMA when kept), with its [model], [diffusion], autoencoder and text encoder; a fresh optimizer and lr "
        "schedule. Needed by lora.rank > 0 (docs/finetuning.md)",
    )
    p.add_argument(
        "--cache-latents",
        action="store_true",
        help="encode the training set once (posterior moments, run_dir/latent_cache) and train from it; the "
        "encoding counts in --max-minutes",
    )
    return p


def default_prompts(data: str, n: int = 8) -> list[str]:
    """The dataset's class prompts, or the first val captions, for training-time sample grids."""
    info = read_info(data)
    if info.get("classes"):
        return [class_prompt(c) for c in info["classes"]]
    loader = read_once(data, "val", n)
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
    return space.to_prior(ae.encode(from_uint8_to(batch["image"], device)).sample())


def offset_noise(z0: torch.Tensor, offset: float) -> torch.Tensor:
    """eps ~ N(0, I) shaped like z0 (B, C, H, W), plus offset * N(0, 1) per (sample, channel) (Guttenberg 2023).

    The offset is one draw per (b, c), broadcast over H and W: noise whose mean the model must also learn to
    remove. offset 0 draws exactly what it always drew (one randn_like), so runs without it keep their numbers.
    """
    eps = torch.randn_like(z0)
    if offset > 0:
        eps = eps + offset * torch.randn(*z0.shape[:2], 1, 1, device=z0.device, dtype=z0.dtype)  # (B, C, 1, 1)
    return eps


def prior_loss(
    net: torch.nn.Module,
    schedule,
    cfg: PriorConfig,
    encoder,
    z0: torch.Tensor,
    captions: list[str],
    rt,
    grounding: tuple[UNet, Grounding, list] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """The objective above (Alg. 1) for a batch of scaled latents, one value per sample: (B,); and the grounding
    losses (prior/grounding.py: {"grounding": L_ground, "grounding_pixel": L_pixel when cfg.grounding_pixel > 0},
    scalars) when `grounding` = (the UNet inside net, Grounding, the samples' json)."""
    captions = drop_captions(captions, cfg.caption_dropout)
    with torch.no_grad():
        states, mask, pooled = text_conditioning(encoder, captions)
    B = z0.shape[0]
    t = torch.randint(0, schedule.T, (B,), device=z0.device)
    eps = offset_noise(z0, cfg.diffusion.noise_offset)
    z_t = schedule.q_sample(z0, t, eps)
    target = schedule.target(cfg.diffusion.prediction, z0, eps, t)
    with rt.autocast(), grounding[0].cross_attention_maps() if grounding else nullcontext() as maps:
        out = net(z_t, t.float(), states, mask, pooled)
    d = cfg.diffusion
    loss = diffusion_loss(out, target, t, schedule, d.loss_weighting, d.min_snr_gamma, d.prediction, d.min_snr_floor)
    if not grounding:
        return loss, None
    _, g, metas = grounding
    terms = {"grounding": g.loss(maps, captions, metas)}
    if cfg.grounding_pixel > 0:
        terms["grounding_pixel"] = g.pixel_loss(maps, captions, metas)
    return loss, terms


@torch.no_grad()
def sample_grid(
    unet,
    cfg: PriorConfig,
    encoder,
    ae,
    space: LatentSpace,
    run_dir: Path,
    prompts,
    path: Path,
    *,
    seed: int,
    step: int,
    saved: bool = True,
) -> Path:
    """The preview grid of `unet` after `step` steps, made as `latentdiff generate` makes it; its command beside it.

    One generator per image (seed + k), the run's sampling config, fp32, and the grid `generate` writes
    (parameters.save_settings_grid), so the command in `path`.txt (`--checkpoint step`) remakes it pixel
    for pixel from the checkpoint of that step, while the run keeps it (train.keep_checkpoints).
    saved: whether the checkpoint of `step` holds these weights; when not, the .txt says so instead.
    """
    was_training = unet.training
    unet.eval()  # as `generate` loads it: dropout off, so the preview is a function of the weights alone
    try:
        pipe = TextToImage(unet, cfg, encoder, ae, space, run_dir, precision="fp32", checkpoint=step if saved else None)
        settings = pipe.settings(prompts, n=cfg.sampling.per_prompt, seed=seed)
        grid = save_settings_grid(pipe.generate(settings), path, settings)
    finally:
        unet.train(was_training)
    if not saved:
        note = (
            f"# no checkpoint was saved at step {step}, the step of {path.name} (train.ckpt_every does not divide "
            "it), so its weights cannot be loaded again; the grids of checkpointed steps carry a command that "
            "remakes them\n"
        )
    else:
        note = (
            f"# remakes {path.name} pixel for pixel (the grid.png of --out), while the run keeps checkpoint "
            f"step {step}:\n{generate_command(settings, precision=settings.precision)}\n"
        )
    path.with_suffix(".txt").write_text(note)
    return grid


# Flags a resume reads back from the run when left out (only local paths are taken from its records).
# The cache's order is not the shards', so a resumed run reads its data the way it started.
FROM_RUN = {
    "autoencoder": lambda meta, run: recorded_stages(meta, run, text=SKIP)[0],
    "text": lambda meta, run: recorded_stages(meta, run, autoencoder=SKIP)[1],
    "cache_latents": lambda meta, run: bool(meta.get("cache_latents", False)),
}


def _autoencoder_resolution(args: argparse.Namespace):
    """The derive step of a new prior: images at its autoencoder's resolution.

    Unless --set resolution=N says otherwise; check_prior_fits then refuses a disagreement.
    """
    recorded = read_meta(args.autoencoder, "autoencoder").get("latent_space") or {}
    return follow(args, "resolution", recorded.get("resolution"))


def _derive(args: argparse.Namespace, source: InitSource | None):
    """A new run's derive step: the --init source's [model] and [diffusion], then its autoencoder's resolution."""
    default = build_parser().get_default("preset")

    def derive(cfg: PriorConfig) -> PriorConfig:
        if source is not None:
            cfg = init_config(cfg, source, args, default)
        return _autoencoder_resolution(args)(cfg)

    return derive


def _sampled(unet: UNet, adapters: Adapters | None, ema: EMA):
    """(the network previews and the end of the run sample, a context in which it holds the weights to sample).

    A full run samples the EMA copy (or the model); a LoRA run its own UNet with the EMA's adapters held in.
    """
    if adapters is not None:
        return unet, adapters.holding(ema.weights())  # {} without an EMA: the trained adapters as they are
    return full_module(ema.module if ema.enabled else unwrap(unet)), nullcontext()


def train(args: argparse.Namespace) -> dict:
    source = None
    if args.init:
        if args.resume:
            raise UserError("--init starts a new run from a prior's weights; a resumed run keeps its own: leave it out")
        source = InitSource.read(args.init)
        # The source's frozen stages, unless given (then they must be the same ones: check_recorded below).
        args.autoencoder, args.text = recorded_stages(source.meta, source.path, args.autoencoder, args.text)
    run = Run.start(
        args,
        PriorConfig,
        PRESETS,
        stage="prior",
        from_run=FROM_RUN,
        required=("data", "autoencoder", "text"),
        derive=_derive(args, source),
    )
    cfg, rt = run.config, run.runtime
    tcfg = cfg.train
    stages = load_frozen_stages(args.autoencoder, args.text, rt.device)
    if source is not None:  # the latents and text states the source learned, as a resume checks its own
        check_recorded(stages, source.meta, source.path)
    if run.recorded is not None:
        check_recorded(stages, run.recorded, run.path)
    check_prior_fits(cfg, stages, f"prior preset {args.preset}" if run.recorded is None else str(run.path))
    ae, space, encoder = stages.autoencoder, stages.latent_space, stages.text
    schedule = make_schedule(cfg.diffusion)
    meta = {
        **stage_records(stages, run.path),
        "data": record_path(args.data, run.path),
        "cache_latents": bool(args.cache_latents),
    }
    recorded_init = (run.recorded or {}).get("init")
    lora = cfg.lora.rank > 0
    if lora and source is None and recorded_init is None:
        raise UserError(
            "lora.rank > 0 trains adapters on a trained prior: pass --init RUN (a prior trained here or imported "
            "with `latentdiff import pipeline`); LoRA on random weights learns next to nothing"
        )
    if lora and tcfg.parallel == "fsdp":
        raise UserError('lora.rank > 0 trains a few adapters: use train.parallel = "ddp" (fsdp shards whole weights)')

    unet = UNet(cfg.model).to(rt.device)
    if source is not None or (lora and recorded_init is not None):
        # The base weights: a new run's source, or the one a resumed LoRA run recorded (its checkpoints hold only
        # the adapters). A resumed full fine-tune restores the whole UNet from its own checkpoint instead.
        if source is not None:
            base = source.load(rt.device)
        else:
            base = load_prior(init_source(run.recorded, run.path), device=rt.device)
            check_init_hash(base, recorded_init, run.path)
        unet.load_state_dict(base.model.state_dict())
        meta["init"] = source.record(base, run.path) if source is not None else recorded_init
        del base
    adapters = add_adapters(unet, cfg.lora) if lora else None
    trained = adapters if adapters is not None else unet  # what the optimizer, the EMA and the checkpoints hold
    if lora:
        meta["lora"] = {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": list(cfg.lora.targets)}
    ema = EMA(trained, tcfg.ema_decay, tcfg.ema_warmup)
    shard_model(unet, rt, tcfg.parallel, ema)  # fsdp: in place, before the optimizer takes the parameters
    opt = make_optimizer(trained.parameters(), tcfg, lr=cfg.lora.lr if lora else None)
    scheduler = run.begin({"model": trained}, {"model": opt}, ema, meta=meta)
    run.watch_loss()  # the denoising loss has a floor: a sustained jump is a divergence (train.loss_jump)
    net = run.wrap(unet)
    prompts = list(cfg.sampling.prompts) or default_prompts(args.data)

    grounding = None
    if cfg.grounding > 0 or cfg.grounding_pixel > 0:
        try:
            check_grounding_data(read_info(args.data), args.data)
        except ValueError as e:
            raise UserError(str(e)) from None
        grounding = Grounding(encoder.tokenizer, per_word=cfg.grounding_per_word)
    if args.cache_latents:
        t_cache = time.monotonic()
        with rt.fork_rng():  # encoding happens on a fresh run only; keep the RNG as a resumed run has it
            cache = LatentCache.build(
                ae, args.data, run.path / "latent_cache", space.resolution, rt, num_workers=tcfg.num_workers
            )
        run.spend(time.monotonic() - t_cache)  # --max-minutes counts the encoding (a reused cache: next to nothing)
        loader = cache.loader(tcfg.batch_size, seed=tcfg.seed, rank=rt.rank, world_size=rt.world_size)
    else:
        loader = make_loader(
            args.data,
            "train",
            tcfg.batch_size,
            seed=tcfg.seed,
            num_workers=tcfg.num_workers,
            resolution=space.resolution,
            device=rt.device,
        )
    # Same seed, same order: a resumed run skips the batches it has already seen.
    batches = run.batches(loader)
    for step in run.steps():
        batch = next(batches)
        lr = scheduler.get_last_lr()[0]
        z0 = batch_latents(batch, ae, space, args.cache_latents, rt.device)
        grounded = (unet, grounding, batch["meta"]) if grounding is not None else None
        loss, ground = prior_loss(net, schedule, cfg, encoder, z0, batch["caption"], rt, grounded)
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        weights = {"grounding": cfg.grounding, "grounding_pixel": cfg.grounding_pixel}
        (loss + sum(weights[k] * v for k, v in (ground or {}).items())).backward()
        grad_norm = plain_tensor(torch.nn.utils.clip_grad_norm_(trained.parameters(), tcfg.grad_clip or math.inf))
        if run.finite(step, loss, grad_norm):
            opt.step()
        run.advance(z0.shape[0], batch.get("skipped", 0))
        ema.update(trained)

        if run.every(tcfg.log_every, step):
            metrics = {"loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item()}
            run.log(step, {**metrics, **{k: v.item() for k, v in (ground or {}).items()}})
        if run.every(tcfg.sample_every, step):
            # On every rank: gathering sharded (fsdp) weights for rank 0 to sample from is a collective.
            sampled, holding = _sampled(unet, adapters, ema)
            saved = run.every(tcfg.ckpt_every, step) or step + 1 == tcfg.steps  # the weights of a checkpoint

            def preview(sampled=sampled, holding=holding, step=step, saved=saved):
                with holding:
                    return sample_grid(
                        sampled,
                        cfg,
                        encoder,
                        ae,
                        space,
                        run.path,
                        prompts,
                        run.path / "samples" / f"step_{step + 1:07d}.png",
                        seed=tcfg.seed,
                        step=step + 1,
                        saved=saved,
                    )

            run.sample(step, preview)
        if run.every(tcfg.ckpt_every, step):
            run.checkpoint(step + 1)

    # Captions longer than the text context were warned about once; the count is a figure of the run.
    summary = {"truncated_captions": encoder.truncated}
    final, holding = _sampled(unet, adapters, ema)  # on every rank, as above
    if rt.is_main:
        with holding:
            grid = sample_grid(
                final,
                cfg,
                encoder,
                ae,
                space,
                run.path,
                prompts,
                run.path / "samples.png",
                seed=tcfg.seed,
                step=run.done,
            )  # run.finish saves the checkpoint of these weights
        summary["sample_grid"] = str(grid)
        run.image("samples", run.done, grid)
        if adapters is not None:  # the file diffusers and ComfyUI load: the adapters sampled above
            weights = ema.weights() if ema.enabled else adapters.state_dict()
            layers = layers_from_adapters(weights, cfg.lora.alpha)
            info = lora_metadata(cfg, run.meta, run.path, run.done, "ema" if ema.enabled else "model")
            summary["lora_file"] = str(write_lora_file(run.path / "lora.safetensors", layers, cfg.model, info))
    return run.finish(summary)


def main(argv: list[str] | None = None) -> dict:
    return stage_main(build_parser, train, argv)


if __name__ == "__main__":
    main()
