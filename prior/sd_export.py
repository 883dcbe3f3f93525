"""A text-to-image pipeline out as a diffusers StableDiffusionPipeline folder (#25 §4).

    write_diffusers_pipeline(TextToImage.from_run("runs/demo/prior"), "out/sd")
    # then: StableDiffusionPipeline.from_pretrained("out/sd")

The folder holds model_index.json, unet/ (prior.interchange), vae/ (the autoencoder's exporter's
names and config, its scaling_factor the latent space's scale; a fine-tuned decoder of the same
architecture as its decoder), text_encoder/ and tokenizer/ (text.interchange.export_text_encoder)
and scheduler/: a DDIMScheduler whose walk is ours (`scheduler_config`). What diffusers cannot
express is refused before anything is written, in one line naming the field.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

from latentdiff.autoencoder.convert import LDM_PREFIX as VAE_PREFIX
from latentdiff.autoencoder.convert import diffusers_config as vae_config
from latentdiff.autoencoder.convert import diffusers_name as vae_name
from latentdiff.autoencoder.convert import export_problems as vae_problems
from latentdiff.autoencoder.convert import ldm_namer as vae_ldm_namer
from latentdiff.core import checkpoint as ckpt
from latentdiff.core.errors import UserError
from latentdiff.core.outputs import STAGING_PREFIX
from latentdiff.text.interchange import export_text_encoder, single_file_text

from .interchange import diffusers_config, export_problems, ldm_namer, to_diffusers
from .sd_import import LDM_UNET_PREFIX

# diffusers' beta_schedule names of the schedules it builds as we do (cosine is written as trained_betas)
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear"}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
CLIP_VOCABULARY = 49408  # CLIPTokenizer's ids (open_clip's BPE file)
# StableDiffusionPipeline sets its scheduler's clip_sample to False when built; this line sets it back.
CLIP_SAMPLE_BACK = "pipe.scheduler.register_to_config(clip_sample=True)"


def decoder_problem(pipe) -> str | None:
    """Why `pipe`'s decoder cannot be the VAE's decoder (None when it can: the autoencoder's own, or a fine-tuned
    decoder of the same architecture, which `latentdiff train decoder` leaves in the same latent space)."""
    if pipe.decoder is pipe.autoencoder.decoder:
        return None
    own, theirs = pipe.autoencoder.decoder.cfg, pipe.decoder.cfg
    names = [f.name for f in fields(own) if f.name != "attention"]  # the backend is no architecture
    differ = [f"{n} = {getattr(theirs, n)!r} (the autoencoder's: {getattr(own, n)!r})" for n in names
              if getattr(theirs, n) != getattr(own, n)]  # fmt: skip
    if differ:
        return f"the decoder run {pipe.decoder_run} has {', '.join(differ)}; diffusers' VAE has the autoencoder's"
    return None


def pipeline_problems(pipe) -> list[str]:
    """Why TextToImage `pipe` cannot be written as a StableDiffusionPipeline (empty when it can), naming the fields."""
    problems = [f"UNet: {p}" for p in export_problems(pipe.unet.cfg)]
    problems += [f"autoencoder: {p}" for p in vae_problems(pipe.autoencoder.cfg)]
    decoder = decoder_problem(pipe)
    if decoder:
        problems.append(decoder)
    if pipe.encoder.model.vocab_size != CLIP_VOCABULARY:
        problems.append(f"a text vocabulary of {pipe.encoder.model.vocab_size} (CLIPTokenizer has {CLIP_VOCABULARY})")
    if pipe.encoder.settings.attend != "all":
        # The prior's cross-attention masked the states after EOT; diffusers' pipeline passes no mask, so its
        # UNet would read states this prior never saw (train the text run with --set encoder.attend="all").
        problems.append(
            f'the text run\'s encoder.attend = "{pipe.encoder.settings.attend}" (diffusers attends to every position)'
        )
    if pipe.cfg.diffusion.prediction == "eps" and pipe.schedule.zero_terminal_snr:
        problems.append("diffusion.prediction = eps with zero_terminal_snr (DDIM divides by abar_T = 0)")
    return problems


def sd_scheduled(diffusion) -> bool:
    """Whether the schedule is Stable Diffusion's own (named betas, no rescale): it is then written as SD writes it."""
    return diffusion.schedule in BETA_SCHEDULES and not diffusion.zero_terminal_snr


def scheduler_config(pipe) -> dict[str, Any]:
    """A DDIMScheduler config (eta 0) that walks as `latentdiff generate --sampler ddim` does with `our_spacing(pipe)`.

    Every walk ends on the data, as ours does (set_alpha_to_one true; SD's own configs say false and end on
    abar_0, which costs the agreement 41-65 dB against 110-130, docs/stable-diffusion.md). Stable
    Diffusion's schedules (scaled_linear or linear, no rescale) are written as SD's scheduler has them:
    named betas, "leading" timesteps with steps_offset 1 (our "sd-leading"). Any other schedule (cosine,
    zero terminal SNR: Lin et al. 2024) is written as our exact betas (trained_betas, float64 ->
    diffusers' float32; a last beta of 1 is abar_T = 0, which DDIM takes with v or x0 prediction), walked
    "trailing" (§3.3; our "trailing", when the step count divides T: diffusers' DDIM steps back T // N).
    Our clip of z_0 (diffusion.clip_x0) is DDIM's clip_sample with clip_sample_range the same bound; both
    recompute eps from the clipped z_0. StableDiffusionPipeline turns clip_sample off when it is built (a
    deprecation of its own): CLIP_SAMPLE_BACK puts it back.
    """
    diffusion = pipe.cfg.diffusion
    betas = pipe.schedule.betas  # (T,) float64
    config: dict[str, Any] = {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": diffusion.timesteps,
        "prediction_type": PREDICTION_TYPES[diffusion.prediction],
        "clip_sample": pipe.clip_x0 is not None,
        "rescale_betas_zero_snr": False,  # a zero-terminal-SNR schedule's betas are written already rescaled
        "set_alpha_to_one": True,  # the last step lands on the data, as ours does (SD's own config: abar_0)
    }
    if pipe.clip_x0 is not None:
        config["clip_sample_range"] = float(pipe.clip_x0)
    if sd_scheduled(diffusion):
        config |= {
            "beta_schedule": BETA_SCHEDULES[diffusion.schedule],
            "beta_start": float(betas[0]),
            "beta_end": float(betas[-1]),
            "timestep_spacing": "leading",
            "steps_offset": 1,
        }
    else:
        config |= {
            "beta_schedule": "linear",  # not read: trained_betas wins
            "trained_betas": [float(b) for b in betas],
            "timestep_spacing": "trailing",
            "steps_offset": 1,  # not read with "trailing"; StableDiffusionPipeline warns when it is not 1
        }
    return config


def our_spacing(pipe) -> str:
    """The `--spacing` with which our samplers walk the exported scheduler's timesteps (see scheduler_config)."""
    return "sd-leading" if sd_scheduled(pipe.cfg.diffusion) else "trailing"


def vae_state(pipe) -> dict:
    """The autoencoder's tensors under diffusers' AutoencoderKL names, its decoder swapped for `pipe.decoder`'s."""
    state = dict(pipe.autoencoder.state_dict()) | _decoder_state(pipe)
    return {vae_name(k): v for k, v in state.items()}


def write_diffusers_pipeline(pipe, out: str | Path) -> dict[str, Any]:
    """Write TextToImage `pipe` as a StableDiffusionPipeline folder at `out`; a summary of what was written.

    `out` must not exist or be empty. The folder is written beside it (`.partial-PID-NAME`) and renamed
    into place at the end, so a failed write leaves nothing. Raises UserError (one line) when `out` is
    taken or `pipe` has what diffusers cannot express (pipeline_problems, naming each field).
    Summary: out, scaling_factor, the decoder written ("autoencoder" or the decoder run), the
    `--spacing` that walks the scheduler's timesteps, and clip_sample (the z_0 bound, or None).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "holds model_index.json" if (out / "model_index.json").exists() else "exists and is not empty"
        raise UserError(f"{out} already {what}; choose another folder")
    problems = pipeline_problems(pipe)
    if problems:
        raise UserError(f"cannot write a StableDiffusionPipeline: {'; '.join(problems)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-{out.name}-", dir=out.parent))
    try:
        _write(pipe, staging)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    ckpt.fsync_dir(out.parent)
    return _summary(pipe, out)


def _summary(pipe, out: Path) -> dict[str, Any]:
    decoder = "autoencoder" if pipe.decoder is pipe.autoencoder.decoder else str(pipe.decoder_run)
    summary = {"out": str(out), "scaling_factor": pipe.latent_space.scale, "decoder": decoder}
    return summary | {"spacing": our_spacing(pipe), "clip_sample": pipe.clip_x0}


def _write(pipe, out: Path) -> None:
    space = pipe.latent_space
    unet_dir, vae_dir = out / "unet", out / "vae"
    ckpt.save_weights(
        unet_dir / "diffusion_pytorch_model.safetensors",
        to_diffusers(pipe.unet.state_dict(), pipe.unet.cfg),
        {"format": "pt"},
    )
    ckpt.write_json(unet_dir / "config.json", diffusers_config(pipe.unet.cfg, space.latent_shape[1]))
    ckpt.save_weights(vae_dir / "diffusion_pytorch_model.safetensors", vae_state(pipe), {"format": "pt"})
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
    ckpt.write_json(out / "model_index.json", index)  # last: a folder with it is complete


def single_file_state(pipe) -> dict:
    """`pipe` as one SD 1.x / 2.x single-file checkpoint's tensors (the layout ComfyUI and AUTOMATIC1111 load).

    The UNet under model.diffusion_model. (LDM's names, prior.interchange.ldm_namer), the VAE under
    first_stage_model. (its mid attention's projections as LDM's 1x1 convs, (C, C, 1, 1)), the text
    encoder under cond_stage_model. (text.interchange.single_file_text). A file names no schedule or
    prediction: its readers assume SD's scaled_linear schedule (and are told v or eps), so another
    schedule is refused. Raises UserError (one line) naming what a single file cannot carry.
    """
    problems = pipeline_problems(pipe)
    if not sd_scheduled(pipe.cfg.diffusion) or pipe.cfg.diffusion.schedule != "scaled_linear":
        d = pipe.cfg.diffusion
        problems.append(
            f"diffusion.schedule = {d.schedule!r} with zero_terminal_snr = {str(d.zero_terminal_snr).lower()} (a "
            "single file records no schedule: its readers assume SD's scaled_linear; write a folder instead)"
        )
    text = {}
    if pipe.encoder.settings.attend == "all":  # else pipeline_problems named it already
        try:
            text = single_file_text(pipe.encoder)
        except ValueError as e:
            problems.append(f"text encoder: {e}")
    if problems:
        raise UserError(f"cannot write a single-file SD checkpoint: {'; '.join(problems)}")
    unet_name = ldm_namer(pipe.unet.cfg)
    state = {LDM_UNET_PREFIX + unet_name(k): v for k, v in pipe.unet.state_dict().items()}
    vae_name = vae_ldm_namer(len(pipe.autoencoder.cfg.channels))
    for key, value in (dict(pipe.autoencoder.state_dict()) | _decoder_state(pipe)).items():
        if ".mid_attn.attn." in key and key.endswith("weight") and value.dim() == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        state[VAE_PREFIX + vae_name(key)] = value
    return state | text


def _decoder_state(pipe) -> dict:
    if pipe.decoder is pipe.autoencoder.decoder:
        return {}
    return {f"decoder.{k}": v for k, v in pipe.decoder.state_dict().items()}


def write_single_file(pipe, out: str | Path) -> dict[str, Any]:
    """Write `pipe` as one safetensors SD checkpoint at `out` (single_file_state); a summary.

    Written to a temporary name and renamed, so a failure leaves no file. Raises UserError (one line)
    when `out` exists or is not a .safetensors name, or the pipeline does not fit (single_file_state).
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"{out}: a single-file checkpoint is written as .safetensors; name it NAME.safetensors")
    if out.exists():
        raise UserError(f"{out} already exists; choose another file")
    state = single_file_state(pipe)
    ckpt.save_weights(out, state, {"format": "pt"})
    return _summary(pipe, out)
