"""Text -> image: text encoder -> prior (guided sampling of z_0) -> decoder.

    pipe = TextToImage.from_run("runs/demo/prior")
    images = pipe(["a photo of a sneaker"], n=4, steps=20, sampler="dpmpp-2m", guidance=3, seed=0)

`images` is (N, 3, H, W) in [-1, 1]. The prior's run directory records the autoencoder
and text encoder it was trained with; both are loaded from there (or the ones given) and checked:
the autoencoder's LatentSpace must equal the one the prior recorded, the text encoder its hash.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from latentdiff.core.checkpoint import CheckpointError
from latentdiff.core.latent_space import LatentSpace
from latentdiff.core.logger import progress
from latentdiff.core.runs import load_run
from latentdiff.core.runtime import pick_device, sampling_dtype
from latentdiff.decoder.load import load_decoder

from .config import PriorConfig, make_schedule
from .frozen_stages import check_prior_fits, check_recorded, load_frozen_stages, recorded_stages
from .latent_sampling import clip_bound, sample_latents
from .samplers import check_number, check_sampler_steps, number_of_evaluations, resolve_options
from .text_conditioning import guided_conditioning
from .unet import UNet


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides the images, written beside them as JSON."""

    prompts: tuple[str, ...]
    n: int  # images per prompt
    steps: int
    sampler: str  # the registry's name (an alias such as "DPM++ 2M Karras" is resolved)
    sampler_options: dict  # every option the sampler ran with (samplers.SAMPLERS[sampler].options)
    guidance: float
    guidance_rescale: float  # Lin et al. 2024 §3.4; 0: plain classifier-free guidance
    negative_prompt: str
    seed: int
    clip_x0: float | None
    run: str
    batch_size: int  # images per sampling batch (stochastic samplers draw their noise batch by batch)
    precision: str  # the network's: "fp32" or "bf16" (autocast), resolved from "auto" for this device and batch


class TextToImage:
    def __init__(self, unet: UNet, cfg: PriorConfig, encoder, autoencoder, latent_space: LatentSpace, run: Path,
                 decoder: torch.nn.Module | None = None, precision: str = "auto"):
        self.unet, self.cfg, self.encoder, self.autoencoder = unet, cfg, encoder, autoencoder
        self.decoder = decoder if decoder is not None else autoencoder.decoder
        self.schedule = make_schedule(cfg.diffusion)
        self.latent_space = latent_space
        self.latent_shape = latent_space.latent_shape
        self.clip_x0 = clip_bound(cfg.diffusion, latent_space)
        self.run = run
        self.precision = precision

    @classmethod
    def from_run(cls, run: str | Path, *, device: torch.device | str | None = None, ema: bool = True,
                 autoencoder: str | Path | None = None, text: str | Path | None = None,
                 decoder: str | Path | None = None, precision: str = "auto") -> "TextToImage":
        """Load a prior run and the autoencoder and text encoder it records (or the ones given, if they match).

        autoencoder, text: use these instead of the recorded ones; the autoencoder's latent space must
        equal the prior's (CheckpointError otherwise), the text encoder's weights its recorded hash.
        decoder: a run of `latentdiff train decoder` to use instead of the autoencoder's own; it
        must have been trained on this autoencoder's latent space (same encoder hash).
        precision: the UNet's while sampling, "auto" | "fp32" | "bf16" (core.runtime.sampling_dtype).
        """
        run = Path(run)
        device = pick_device(device)
        prior = load_run(run, "prior", PriorConfig, lambda cfg, meta: UNet(cfg.model), device=device, ema=ema)
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
                    f"train a decoder with --autoencoder {stages.autoencoder_path}")
        return cls(prior.model, prior.config, stages.text, stages.autoencoder, stages.latent_space, run,
                   decoder=swapped, precision=precision)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.inference_mode()
    def __call__(self, prompts: list[str] | str, *, n: int = 1, steps: int | None = None, sampler: str | None = None,
                 guidance: float | None = None, negative_prompt: str = "", seed: int = 0, eta: float | None = None,
                 guidance_rescale: float = 0.0, sampler_options: dict | None = None,
                 batch_size: int = 64, show_progress: bool = False) -> torch.Tensor:
        """(len(prompts) * n, 3, H, W) images in [-1, 1], prompt-major (all images of prompt 0 first)."""
        settings = self.settings(prompts, n=n, steps=steps, sampler=sampler, guidance=guidance,
                                 negative_prompt=negative_prompt, seed=seed, eta=eta, batch_size=batch_size,
                                 guidance_rescale=guidance_rescale, sampler_options=sampler_options)
        rows = [p for p in settings.prompts for _ in range(n)]
        g = torch.Generator(self.device).manual_seed(seed)
        dtype = torch.bfloat16 if settings.precision == "bf16" else None
        evals = number_of_evaluations(settings.sampler, settings.steps)
        bar = progress(evals * ((len(rows) + batch_size - 1) // batch_size), "sampling", enabled=show_progress)
        images = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            cond, uncond = guided_conditioning(self.encoder, chunk, [negative_prompt] * len(chunk))
            z0 = sample_latents(self.unet, self.schedule, self.cfg.diffusion.prediction, cond, uncond,
                                self.latent_shape, sampler=settings.sampler, steps=settings.steps,
                                guidance=settings.guidance, guidance_rescale=settings.guidance_rescale,
                                generator=g, clip_x0=self.clip_x0,
                                callback=lambda *_: bar.update(1), dtype=dtype, **settings.sampler_options)
            images.append(self.decoder(self.latent_space.to_decoder(z0)).clamp(-1, 1).float().cpu())
        bar.close()
        return torch.cat(images)

    def settings(self, prompts, *, n, steps, sampler, guidance, negative_prompt, seed, eta=None,
                 batch_size: int = 64, guidance_rescale: float = 0.0,
                 sampler_options: dict | None = None) -> GenerationSettings:
        """Resolve defaults from the run's sampling config and check every value (ValueError with the range)."""
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
        check_number("seed", seed, int, 0, 2**63 - 1)
        check_number("batch_size", batch_size, int, 1)
        # One precision for every batch of the call: rows per network pass of a full batch.
        rows = min(batch_size, len(prompts) * n) * (1 if guidance in (0.0, 1.0) else 2)
        precision = "bf16" if sampling_dtype(self.device, self.precision, rows) == torch.bfloat16 else "fp32"
        return GenerationSettings(prompts, n, steps, sampler, options, guidance, guidance_rescale, negative_prompt,
                                  seed,
                                  self.clip_x0, str(self.run), batch_size, precision)
