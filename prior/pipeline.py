"""Text -> image: text encoder -> prior (guided sampling of z_0) -> decoder.

    pipe = TextToImage.from_run("runs/demo/prior")
    images = pipe(["a photo of a sneaker"], n=4, steps=20, sampler="dpmpp-2m", guidance=3, seed=0)

`images` is (N, 3, H, W) in [-1, 1]. img2img and inpainting (img2img.py):

    images = pipe("a blue circle", init_image="photo.png", strength=0.6)
    images = pipe("a blue circle", init_image="photo.png", mask="mask.png")   # white = repaint
    # the kept pixels are photo.png's own; feather=F fades the new ones in; resample=U with sampler="ddpm": RePaint

Each image has its own random generator, seeded seed + k for image k of the call (prompt-major),
so image k is the same whatever n and batch_size, and `pipe([prompt], n=1, seed=seed + k)` makes
it alone. The prior's run directory records the autoencoder
and text encoder it was trained with; both are loaded from there (or the ones given) and checked:
the autoencoder's LatentSpace must equal the one the prior recorded, the text encoder its hash.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from latentdiff.core import checkpoint as ckpt
from latentdiff.core.checkpoint import CheckpointError
from latentdiff.core.latent_space import LatentSpace
from latentdiff.core.logger import progress
from latentdiff.core.runtime import SAMPLING_PRECISIONS, pick_device, sampling_dtype
from latentdiff.decoder.load import load_decoder

from .binding import caption_groups
from .config import PriorConfig, make_schedule
from .frozen_stages import check_prior_fits, check_recorded, load_frozen_stages, recorded_stages
from .guidance import check_interval
from .img2img import composite, feathered, load_image, load_mask, start_timestep
from .init import load_prior
from .latent_sampling import clip_bound, sample_latents
from .lora import merge, parse_lora, read_lora_file
from .samplers import check_number, check_sampler_steps, levels, number_of_evaluations, resolve_options
from .text_conditioning import guided_conditioning
from .unet import UNet


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides the images, written beside them as JSON and into each PNG (parameters.py)."""

    prompts: tuple[str, ...]
    n: int  # images per prompt; image k of the call (prompt-major) is made from seed + k
    steps: int
    sampler: str  # the registry's name (an alias such as "DPM++ 2M Karras" is resolved)
    sampler_options: dict  # every option the sampler ran with (samplers.SAMPLERS[sampler].options)
    guidance: float
    guidance_rescale: float  # Lin et al. 2024 §3.4; 0: plain classifier-free guidance
    negative_prompt: str
    seed: int  # image k's generator is seeded with seed + k: the same image whatever n and batch_size
    clip_x0: float | None
    run: str
    batch_size: int  # images per sampling pass (memory vs speed; the images do not depend on it)
    precision: str  # the network's: "fp32" or "bf16" (autocast), resolved from "auto" for this device
    init_image: str | None = None  # img2img: the image file SDEdit starts from (absolute path); None: text only
    mask: str | None = None  # inpainting: a mask image file, white = repaint (absolute path)
    strength: float = 1.0  # img2img: the sampler starts at timestep strength * T - 1; 1 is text-to-image
    decoder: str | None = None  # the `latentdiff train decoder` run decoding instead of the autoencoder's own
    guidance_interval: tuple[float, float] | None = None  # guide where sigma_lo < sigma(t) <= sigma_hi; None: always
    feather: int = 0  # inpainting: pixels of the repainted region over which it fades in (img2img.feathered)
    resample: int = 1  # inpainting: RePaint's U, each step taken U times (img2img.sample_repaint); 1: off
    checkpoint: int | None = None  # the step of the run's checkpoint sampled (None: a run without step folders)
    loras: tuple[tuple[str, float], ...] = ()  # (LoRA file, absolute path; scale) merged into the UNet, in order
    binding: float = 0.0  # attention binding's step (prior/binding.py); 0: off
    binding_until: float = 0.5  # it applies at t >= binding_until * T


class TextToImage:
    def __init__(
        self,
        unet: UNet,
        cfg: PriorConfig,
        encoder,
        autoencoder,
        latent_space: LatentSpace,
        run: Path,
        decoder: torch.nn.Module | None = None,
        precision: str = "auto",
        decoder_run: str | None = None,
        checkpoint: int | None = None,
    ):
        self.unet, self.cfg, self.encoder, self.autoencoder = unet, cfg, encoder, autoencoder
        self.decoder = decoder if decoder is not None else autoencoder.decoder
        self.schedule = make_schedule(cfg.diffusion)
        self.latent_space = latent_space
        self.latent_shape = latent_space.latent_shape
        self.clip_x0 = clip_bound(cfg.diffusion, latent_space)
        self.run = run
        self.precision = precision
        self.decoder_run = decoder_run  # where `decoder` came from, recorded in the settings
        self.checkpoint = checkpoint  # the step of the prior's weights, recorded in the settings
        self.loras: tuple[tuple[str, float], ...] = ()  # LoRA files merged into `unet` (from_run), in the settings

    @classmethod
    def from_run(
        cls,
        run: str | Path,
        *,
        device: torch.device | str | None = None,
        ema: bool = True,
        autoencoder: str | Path | None = None,
        text: str | Path | None = None,
        decoder: str | Path | None = None,
        precision: str = "auto",
        checkpoint: int | None = None,
        loras: Sequence[tuple[str | Path, float]] = (),
    ) -> TextToImage:
        """Load a prior run and the autoencoder and text encoder it records (or the ones given, if they match).

        autoencoder, text: use these instead of the recorded ones; the autoencoder's latent space must
        equal the prior's (CheckpointError otherwise), the text encoder's weights its recorded hash.
        decoder: a run of `latentdiff train decoder` to use instead of the autoencoder's own; it
        must have been trained on this autoencoder's latent space (same encoder hash).
        precision: the UNet's while sampling, "auto" | "fp32" | "bf16" (core.runtime.sampling_dtype).
        checkpoint: the step of the checkpoint to load (one the run still keeps); None: the newest.
        loras: (LoRA file, scale) pairs merged into the UNet in order, W + scale (alpha / r) B A each
        (prior/lora.py); UserError for a file made for another UNet. A LoRA run loads as its base with its
        adapters merged (prior/init.load_prior).
        """
        run = Path(run)
        device = pick_device(device)
        folder, step = checkpoint_folder(run, checkpoint)
        prior = load_prior(folder, device=device, ema=ema)
        for file, scale in loras:
            merge(prior.model, read_lora_file(file, prior.config.model), scale, str(file))
        stages = load_frozen_stages(*recorded_stages(prior.meta, run, autoencoder, text), device)
        check_recorded(stages, prior.meta, run)
        check_prior_fits(prior.config, stages, str(run))
        swapped = None
        if decoder is not None:
            swapped, dec_meta = load_decoder(decoder, device)
            if dec_meta["encoder_hash"] != stages.latent_space.encoder_hash:
                raise CheckpointError(
                    f"decoder {decoder} was trained for the latents of autoencoder {dec_meta['autoencoder']['path']} "
                    f"(encoder hash {dec_meta['encoder_hash']}), but this prior uses {stages.autoencoder_path} "
                    f"(encoder hash {stages.latent_space.encoder_hash}); "
                    f"train a decoder with --autoencoder {stages.autoencoder_path}"
                )
        pipe = cls(
            prior.model,
            prior.config,
            stages.text,
            stages.autoencoder,
            stages.latent_space,
            run,
            decoder=swapped,
            precision=precision,
            decoder_run=None if decoder is None else str(Path(decoder).resolve()),
            checkpoint=step,
        )
        pipe.loras = tuple((str(Path(file).resolve()), float(scale)) for file, scale in loras)
        return pipe

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.inference_mode()
    def __call__(
        self, prompts: list[str] | str, *, only: list[int] | None = None, show_progress: bool = False, **options
    ) -> torch.Tensor:
        """(len(prompts) * n, 3, H, W) images in [-1, 1], prompt-major (all images of prompt 0 first).

        options: the keywords of `settings` (n, steps, sampler, guidance, negative_prompt, seed, eta,
        batch_size, guidance_rescale, sampler_options, and init_image, mask, strength for img2img and
        inpainting: module docstring), checked there. only: the indices of the images to make and return
        (in that order); their batches are run whole, so each comes out exactly as in the full call.
        """
        return self.generate(self.settings(prompts, **options), only=only, show_progress=show_progress)

    @torch.inference_mode()
    def generate(
        self, settings: GenerationSettings, *, only: list[int] | None = None, show_progress: bool = False
    ) -> torch.Tensor:
        """The images of checked `settings` (from `settings()`), or those listed in `only`: (N, 3, H, W) in [-1, 1].

        Inpainting: the kept pixels are the init image's own (img2img.composite), not their reconstruction.
        """
        made = {}
        kept = None
        if settings.mask is not None:
            resolution = self.latent_space.resolution
            alpha = feathered(load_mask(settings.mask, resolution, self.latent_space.downsampling)[0], settings.feather)
            kept = load_image(settings.init_image, resolution), alpha
        for i, z0 in self._sample(settings, only, show_progress):  # decoded batch by batch, as sampled
            images = self.decoder(self.latent_space.to_decoder(z0)).clamp(-1, 1).float().cpu()
            if kept is not None:
                images = composite(images, *kept)
            made.update({i + j: image for j, image in enumerate(images)})
        return torch.stack([made[k] for k in self._wanted(settings, only)])

    @torch.inference_mode()
    def latents(
        self, settings: GenerationSettings, *, only: list[int] | None = None, show_progress: bool = False
    ) -> torch.Tensor:
        """z_0 in prior units (N, c, h, w) of the images of `settings` (or of those in `only`), before decoding.

        Inpainting: the kept latents are the image's (its pixels are put back by `generate` after decoding).
        """
        made = {}
        for i, z0 in self._sample(settings, only, show_progress):
            made.update({i + j: z for j, z in enumerate(z0)})
        return torch.stack([made[k] for k in self._wanted(settings, only)])

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) images in [-1, 1] -> prior latents: the posterior mean, scaled by the latent space."""
        return self.latent_space.to_prior(self.autoencoder.encode(images.to(self.device)).mode())

    @staticmethod
    def _wanted(settings: GenerationSettings, only: list[int] | None) -> list[int]:
        total = len(settings.prompts) * settings.n
        wanted = list(range(total)) if only is None else list(only)
        if any(not isinstance(k, int) or not 0 <= k < total for k in wanted):
            raise ValueError(f"only: image indices must be in 0..{total - 1}, got {wanted}")
        return wanted

    def _sample(self, settings: GenerationSettings, only: list[int] | None, show_progress: bool):
        """(index of the batch's first image, its z_0 (rows, c, h, w)) for each batch holding a wanted image."""
        rows = [p for p in settings.prompts for _ in range(settings.n)]
        wanted = self._wanted(settings, only)
        bs = settings.batch_size
        batches = [i for i in range(0, len(rows), bs) if any(i <= k < i + bs for k in wanted)]
        z_init = mask = t_start = None
        if settings.init_image is not None:
            z_init = self.encode(load_image(settings.init_image, self.latent_space.resolution))
            if settings.strength == 0.0:  # no step: the image's reconstruction
                for i in batches:
                    yield i, z_init.expand(len(rows[i : i + bs]), *z_init.shape[1:])
                return
            t_start = start_timestep(settings.strength, self.schedule.T)
            if settings.mask is not None:
                mask = load_mask(settings.mask, self.latent_space.resolution, self.latent_space.downsampling)[1]
                mask = mask.to(self.device)
        dtype = torch.bfloat16 if settings.precision == "bf16" else None
        bar = progress(
            number_of_evaluations(settings.sampler, settings.steps) * len(batches), "sampling", enabled=show_progress
        )  # RePaint's U evaluations a step count as one
        for i in batches:
            chunk = rows[i : i + bs]
            cond, uncond = guided_conditioning(self.encoder, chunk, [settings.negative_prompt] * len(chunk))
            generators = [torch.Generator(self.device).manual_seed(settings.seed + k) for k in range(i, i + len(chunk))]
            yield (
                i,
                sample_latents(
                    self.unet,
                    self.schedule,
                    self.cfg.diffusion.prediction,
                    cond,
                    uncond,
                    self.latent_shape,
                    sampler=settings.sampler,
                    steps=settings.steps,
                    guidance=settings.guidance,
                    guidance_rescale=settings.guidance_rescale,
                    guidance_interval=settings.guidance_interval,
                    generator=generators,
                    clip_x0=self.clip_x0,
                    callback=lambda *_: bar.update(1),
                    dtype=dtype,
                    z_init=z_init,
                    t_start=t_start,
                    mask=mask,
                    resample=settings.resample,
                    binding=settings.binding,
                    binding_until=settings.binding_until,
                    groups=[caption_groups(self.encoder.tokenizer, p) for p in chunk] if settings.binding else None,
                    **settings.sampler_options,
                ),
            )
        bar.close()

    def settings(
        self,
        prompts: list[str] | str,
        *,
        n: int = 1,
        steps: int | None = None,
        sampler: str | None = None,
        guidance: float | None = None,
        negative_prompt: str = "",
        seed: int = 0,
        eta: float | None = None,
        batch_size: int = 64,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] | str | None = None,
        sampler_options: dict | None = None,
        init_image: str | Path | None = None,
        mask: str | Path | None = None,
        strength: float | None = None,
        feather: int = 0,
        resample: int = 1,
        binding: float | None = None,
        binding_until: float | None = None,
    ) -> GenerationSettings:
        """Resolve defaults from the run's sampling config and check every value (ValueError with the range).

        steps, sampler, guidance: None is the run's (its sampling config); n: images per prompt;
        image k of the call (prompt-major) is made from seed + k.
        binding, binding_until: attention binding's step and where it stops (prior/binding.py); None: the run's.
        guidance_interval: (sigma_lo, sigma_hi) in the schedule's VE sigma, or "LO,HI"; guidance only where
        sigma_lo < sigma(t) <= sigma_hi (Kynkäänniemi et al. 2024); None or "all": at every step.

        strength defaults to 0.75 for img2img and 1.0 with a mask (repaint from pure noise); it needs
        an init image, and so does a mask. The image files are read here, so a bad one fails first.
        feather (pixels, 0..resolution) and resample (RePaint's U, with sampler ddpm) apply with a mask.
        """
        prompts = (prompts,) if isinstance(prompts, str) else tuple(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if any(not isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")
        check_number("n (images per prompt)", n, int, 1)
        s = self.cfg.sampling
        sampler, options = resolve_options(sampler or s.sampler, {"eta": eta, **(sampler_options or {})})
        steps = s.steps if steps is None else steps  # 0 is refused below, not read as "the default"
        check_sampler_steps(sampler, steps, self.schedule)
        guidance = check_number("guidance", s.guidance if guidance is None else guidance, float, 0.0)
        guidance_rescale = check_number("guidance_rescale", guidance_rescale, float, 0.0, 1.0)
        guidance_interval = check_interval(guidance_interval)
        binding = check_number("binding", s.binding if binding is None else binding, float, 0.0)
        binding_until = check_number(
            "binding_until", s.binding_until if binding_until is None else binding_until, float, 0.0, 1.0
        )
        check_number("seed", seed, int, 0, 2**63 - len(prompts) * n)  # image k's seed, seed + k, fits in int64
        check_number("batch_size", batch_size, int, 1)
        check_number("feather", feather, int, 0, self.latent_space.resolution)
        check_number("resample", resample, int, 1, 1000)
        if (feather or resample > 1) and mask is None:
            raise ValueError(f"{'feather' if feather else 'resample'} applies to inpainting: it needs a mask")
        if resample > 1 and sampler != "ddpm":
            raise ValueError(
                f"resample {resample} (RePaint) takes DDPM's ancestral steps: it needs --sampler ddpm, not {sampler}"
            )
        if init_image is None:
            if mask is not None or strength is not None:
                raise ValueError(f"{'a mask' if mask is not None else 'strength'} needs an init image (img2img)")
            strength = 1.0
        else:
            init_image = str(Path(init_image).resolve())
            load_image(init_image, self.latent_space.resolution)  # a missing or unreadable file fails here
            if mask is not None:
                mask = str(Path(mask).resolve())
                load_mask(mask, self.latent_space.resolution, self.latent_space.downsampling)
            strength = check_number(
                "strength", (1.0 if mask else 0.75) if strength is None else strength, float, 0.0, 1.0
            )
            t_start = start_timestep(strength, self.schedule.T)
            if 0 < strength * self.schedule.T <= 1:
                raise ValueError(
                    f"strength {strength:g} starts at timestep {t_start:g}, below the first; use 0 "
                    f"(the image's reconstruction) or more than 1/T = {1 / self.schedule.T:g}"
                )
            if strength > 0 and t_start is not None:
                levels(sampler, self.schedule, steps, t_start, **options)  # enough timesteps for the steps
        # One precision for the whole call, from the device alone: never from the batch, so image k is the
        # same whatever n and batch_size (core.runtime.sampling_dtype).
        precision = "bf16" if sampling_dtype(self.device, self.precision) == torch.bfloat16 else "fp32"
        return GenerationSettings(
            prompts,
            n,
            steps,
            sampler,
            options,
            guidance,
            guidance_rescale,
            negative_prompt,
            seed,
            self.clip_x0,
            str(self.run),
            batch_size,
            precision,
            init_image,
            mask,
            strength,
            self.decoder_run,
            guidance_interval,
            feather,
            resample,
            self.checkpoint,
            self.loras,
            binding,
            binding_until,
        )


# ---- the command-line flags of from_run, shared by `generate`, `evaluate` and `serve` -------------


def add_stage_arguments(p: argparse.ArgumentParser) -> None:
    """--autoencoder and --text: from_run's `autoencoder` and `text`, the prior's frozen stages moved elsewhere."""
    p.add_argument(
        "--autoencoder",
        metavar="RUN",
        help="the prior's autoencoder run, if not where the run recorded it "
        "(its latent space must be the one the prior trained on)",
    )
    p.add_argument(
        "--text",
        metavar="RUN",
        help="the prior's text encoder (run or openclip:MODEL:PRETRAINED), if "
        "not where the run recorded it (same weights, checked by hash)",
    )
    add_lora_argument(p)


def add_lora_argument(p: argparse.ArgumentParser) -> None:
    """--lora FILE[:SCALE], repeatable: from_run's `loras` (parse with lora_arguments)."""
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="merge a LoRA file (kohya / diffusers-SD keys, e.g. a LoRA run's lora.safetensors) into the prior's "
        "UNet at SCALE (default 1): W + SCALE (alpha / rank) B A; repeat to stack several",
    )


def lora_arguments(args: argparse.Namespace) -> list[tuple[str, float]]:
    """--lora FILE[:SCALE] values as (file, scale) pairs (UserError for a scale that is not a number)."""
    return [parse_lora(text) for text in getattr(args, "lora", None) or []]


def add_precision_argument(p: argparse.ArgumentParser) -> None:
    """--precision: from_run's `precision` (core.runtime.sampling_dtype)."""
    p.add_argument(
        "--precision",
        choices=list(SAMPLING_PRECISIONS),
        default="auto",
        help="the UNet's while sampling: auto is bf16 on CUDA and on CPUs with AMX, else fp32",
    )


def add_guidance_rescale_argument(p: argparse.ArgumentParser) -> None:
    """--guidance-rescale: `settings`' guidance_rescale."""
    p.add_argument(
        "--guidance-rescale",
        type=float,
        default=0.0,
        help="guidance rescale phi in [0, 1] (Lin et al. 2024 §3.4; 0.7 in the paper; default: 0, off)",
    )


def add_guidance_interval_argument(p: argparse.ArgumentParser) -> None:
    """--guidance-interval: `settings`' guidance_interval."""
    p.add_argument(
        "--guidance-interval",
        default=None,
        metavar="LO,HI",
        help="guide only at noise levels sigma in (LO, HI], the conditional model alone elsewhere "
        "(Kynkäänniemi et al. 2024; `inf` for no upper end; default: all, every step)",
    )


def add_binding_arguments(p: argparse.ArgumentParser) -> None:
    """--binding, --binding-until: `settings`' binding and binding_until (None: the run's [sampling] values)."""
    p.add_argument(
        "--binding",
        type=float,
        metavar="STEP",
        help="attention binding for scenes captions naming two objects: z_t moved STEP (in units of its RMS) a step "
        "down the energy of their words' cross-attention maps (prior/binding.py; 0: off; default: the run's "
        "[sampling] binding)",
    )
    p.add_argument(
        "--binding-until",
        type=float,
        metavar="FRACTION",
        help="attention binding applies at timesteps t >= FRACTION * T (default: the run's [sampling] binding_until)",
    )


def checkpoint_folder(run: Path, step: int | None) -> tuple[Path, int | None]:
    """(folder holding the weights, its step) of a prior run's checkpoint at `step`, or of its newest (step None).

    The newest is the one core.checkpoint.committed_file picks (a corrupt newest falls back, saying so);
    a run from before step folders gives itself and None. Raises CheckpointError naming the steps kept.
    """
    if step is None:
        folder = ckpt.committed_file(run, ckpt.META).parent
        return folder, None if folder == run else ckpt.verify(folder).step
    check_number("checkpoint", step, int, 0)
    kept = [f for f in ckpt.checkpoint_dirs(run) if ckpt.folder_order(f)[0] == step]  # newest copy first
    if not kept:
        steps = sorted({ckpt.folder_order(f)[0] for f in ckpt.checkpoint_dirs(run)})
        raise CheckpointError(
            f"{run} keeps no checkpoint of step {step} (it keeps {', '.join(map(str, steps)) or 'none'}; "
            "older ones are pruned: train.keep_checkpoints)"
        )
    return ckpt.verify(kept[0]).path, step


def pipeline_from_arguments(args: argparse.Namespace, device: torch.device | str | None = None) -> TextToImage:
    """TextToImage.from_run(--run) with --decoder, --precision and the flags of add_stage_arguments.

    device: where to load it (default: --device). Raises CheckpointError for a run that does not fit.
    """
    return TextToImage.from_run(
        args.run,
        device=args.device if device is None else device,
        decoder=args.decoder,
        precision=args.precision,
        autoencoder=args.autoencoder,
        text=args.text,
        checkpoint=getattr(args, "checkpoint", None),
        loras=lora_arguments(args),
    )
