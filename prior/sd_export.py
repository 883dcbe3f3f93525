"""A text-to-image pipeline out as a diffusers StableDiffusionPipeline folder (#25 §4).

    write_diffusers_pipeline(TextToImage.from_run("runs/demo/prior"), "out/sd")
    # then: StableDiffusionPipeline.from_pretrained("out/sd")

The folder holds model_index.json, unet/ (prior.interchange), vae/ (the autoencoder's exporter's
names and config, its scaling_factor the latent space's scale), text_encoder/ and tokenizer/
(text.interchange.export_text_encoder) and scheduler/: a DDIMScheduler on the prior's own betas
whose timesteps are ours with `--spacing sd-leading` (docs/stable-diffusion.md, "The same image in diffusers").
What diffusers cannot express is refused before anything is written, in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from latentdiff.autoencoder.convert import diffusers_config as vae_config
from latentdiff.autoencoder.convert import diffusers_name as vae_name
from latentdiff.autoencoder.convert import export_problems as vae_problems
from latentdiff.core import checkpoint as ckpt
from latentdiff.core.errors import UserError
from latentdiff.text.interchange import export_text_encoder

from .interchange import diffusers_config, export_problems, to_diffusers

# diffusers' beta_schedule names of our schedules (cosine is its "squaredcos_cap_v2")
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def pipeline_problems(pipe) -> list[str]:
    """Why TextToImage `pipe` cannot be written as a StableDiffusionPipeline (empty when it can)."""
    problems = [f"UNet: {p}" for p in export_problems(pipe.unet.cfg)]
    problems += [f"autoencoder: {p}" for p in vae_problems(pipe.autoencoder.cfg)]
    if pipe.decoder is not pipe.autoencoder.decoder:
        problems.append("a separately trained decoder (diffusers' VAE decodes with the autoencoder's own)")
    if pipe.encoder.model.vocab_size != 49408:
        problems.append(f"a text vocabulary of {pipe.encoder.model.vocab_size} (CLIPTokenizer has 49408)")
    if pipe.cfg.diffusion.zero_terminal_snr:
        problems.append("zero_terminal_snr (the scheduler's rescale_betas_zero_snr differs from ours)")
    return problems


def scheduler_config(pipe) -> dict[str, Any]:
    """A DDIMScheduler config on `pipe`'s schedule; its timesteps are ours with spacing "sd-leading"."""
    diffusion = pipe.cfg.diffusion
    betas = pipe.schedule.betas  # (T,) float64
    config = {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": diffusion.timesteps,
        "beta_schedule": BETA_SCHEDULES[diffusion.schedule],
        "prediction_type": PREDICTION_TYPES[diffusion.prediction],
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "clip_sample": False,
    }
    if diffusion.schedule in ("linear", "scaled_linear"):
        config |= {"beta_start": float(betas[0]), "beta_end": float(betas[-1])}
    return config


def write_diffusers_pipeline(pipe, out: str | Path) -> dict[str, Any]:
    """Write TextToImage `pipe` as a StableDiffusionPipeline folder at `out`; a summary of what was written.

    Raises UserError (one line) when `out` already holds a pipeline or `pipe` has what diffusers cannot
    express (pipeline_problems). diffusers attends to all 77 text positions: a prior trained here with
    attend="to_end" then reads states it never saw; the summary's "note" says so.
    """
    out = Path(out)
    if (out / "model_index.json").exists():
        raise UserError(f"{out} already holds model_index.json; choose another folder")
    problems = pipeline_problems(pipe)
    if problems:
        raise UserError(f"cannot write a StableDiffusionPipeline: {'; '.join(problems)}")
    space = pipe.latent_space
    unet_dir, vae_dir = out / "unet", out / "vae"
    ckpt.save_weights(
        unet_dir / "diffusion_pytorch_model.safetensors",
        to_diffusers(pipe.unet.state_dict(), pipe.unet.cfg),
        {"format": "pt"},
    )
    ckpt.write_json(unet_dir / "config.json", diffusers_config(pipe.unet.cfg, space.latent_shape[1]))
    vae_state = {vae_name(k): v for k, v in pipe.autoencoder.state_dict().items()}
    ckpt.save_weights(vae_dir / "diffusion_pytorch_model.safetensors", vae_state, {"format": "pt"})
    ckpt.write_json(vae_dir / "config.json", vae_config(pipe.autoencoder.cfg, space.scale, space.resolution))
    export_text_encoder(pipe.encoder, out / "text_encoder", out / "tokenizer")
    ckpt.write_json(out / "scheduler" / "scheduler_config.json", scheduler_config(pipe))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    masked = pipe.encoder.settings.attend != "all"
    note = "the prior attended to the text up to EOT; diffusers attends to all positions" if masked else ""
    return {"out": str(out), "scaling_factor": space.scale, "note": note}
