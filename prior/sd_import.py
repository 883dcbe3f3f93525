"""A Stable Diffusion 1.x / 2.x pipeline as three latentdiff runs: `latentdiff import pipeline SRC --out DIR`.

SRC is a diffusers StableDiffusionPipeline folder (model_index.json, unet/, text_encoder/,
tokenizer/, vae/, scheduler/) or a single-file SD checkpoint (the UNet under
`model.diffusion_model.`, the text encoder under `cond_stage_model.`, the VAE under
`first_stage_model.`; safetensors, or a pickle read through core.safe_load). DIR receives
- DIR/autoencoder: autoencoder.interchange.import_autoencoder's run (latent scale 0.18215 from
  the VAE's scaling_factor; std and range measured on --data as that import always does);
- DIR/text: a text run of the CLIP text tower alone (image_tower = false) with SD's settings
  (text.encoder.SD1 / SD2: layer, padding, every position attended);
- DIR/prior: a prior run whose config.toml is the UNet (prior.interchange) and the scheduler's
  training schedule (scaled_linear over 1000 steps, eps or v), and whose meta.json records the two
  runs above as a trained prior records its frozen stages (prior.frozen_stages.stage_records).
So `generate`, `evaluate`, `serve` and `train decoder` read them as runs trained here. What does
not fit (SDXL's second text encoder, another UNet or scheduler, missing files) stops in one line
before anything is written. Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentdiff.autoencoder.interchange import diffusers_weights, import_autoencoder
from latentdiff.core import checkpoint as ckpt
from latentdiff.core.config import ConfigError, dumps_toml, to_dict
from latentdiff.core.errors import UserError
from latentdiff.core.safe_load import read_tensor_file
from latentdiff.text.encoder import TextEncoder
from latentdiff.text.interchange import read_diffusers, read_single_file
from latentdiff.text.stage import TextStageConfig

from .config import DiffusionConfig, PriorConfig, SamplingConfig
from .frozen_stages import load_frozen_stages, stage_records
from .interchange import config_from_diffusers, from_diffusers, from_ldm
from .schedule import Prediction
from .unet import UNetConfig

SD_SCALING_FACTOR = 0.18215  # SD 1.x/2.x's VAE latent scale (its scaling_factor); a single file records none
TEXT_MODEL_JSON = "open_clip_config.json"  # the imported text run's model config, in the run directory
SD_GUIDANCE = 7.5  # StableDiffusionPipeline's default guidance_scale, kept as the imported prior's default
LDM_UNET_PREFIX = "model.diffusion_model."
# diffusers' prediction_type -> latentdiff's prediction
PREDICTIONS: dict[str, Prediction] = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# scaled_linear's endpoints (beta_start, beta_end) at T = 1000: the schedule Stable Diffusion trained with, and
# what prior.schedule builds for "scaled_linear" (DiffusionConfig has no beta fields, so others cannot import).
SD_BETAS = (0.00085, 0.012)
FOLDER_PARTS = {
    "unet": "the UNet2DConditionModel (config.json + diffusion_pytorch_model.safetensors)",
    "text_encoder": "the CLIPTextModel (config.json + model.safetensors)",
    "tokenizer": "the CLIPTokenizer (vocab.json, merges.txt, special_tokens_map.json)",
    "vae": "the AutoencoderKL (config.json + diffusion_pytorch_model.safetensors)",
    "scheduler": "the scheduler (scheduler_config.json)",
}


@dataclass(frozen=True)
class Pipeline:
    """A Stable Diffusion pipeline read and checked, before anything is written."""

    path: Path
    format: str  # "diffusers" (a pipeline folder) or "single-file"
    family: str  # "sd1" or "sd2" (the text encoder's)
    unet: UNetConfig
    unet_state: dict[str, torch.Tensor]  # under latentdiff's names, checked against `unet`
    diffusion: DiffusionConfig
    text: TextEncoder
    vae: Path  # what import_autoencoder reads: the vae/ folder or the single file
    scaling_factor: float | None  # None: the VAE's own config.json gives it
    resolution: int  # image side: the UNet's sample_size times the VAE's downsampling


# ---------------------------------------------------------------- the scheduler


def diffusion_from_scheduler(config: dict[str, Any], where: str) -> DiffusionConfig:
    """The DiffusionConfig of a diffusers scheduler_config.json (DDIM, PNDM, DDPM, Euler, ... alike).

    Only the training schedule matters (samplers are chosen at generation): betas scaled_linear (or
    linear) between SD's endpoints over num_train_timesteps, prediction_type, rescale_betas_zero_snr.
    diffusers clips z_0 only with clip_sample = true (SD: false), so the prior clips the same way.
    Raises ConfigError (one line) naming the first field that differs.
    """
    if config.get("trained_betas") is not None:
        raise ConfigError(f"{where}: trained_betas (an explicit beta table) is not supported; latentdiff builds betas")
    kind = config.get("beta_schedule", "linear")
    if kind not in ("scaled_linear", "linear"):
        raise ConfigError(f"{where}: beta_schedule {kind!r} is not supported (latentdiff imports scaled_linear)")
    T = int(config.get("num_train_timesteps", 1000))
    want = tuple(b * 1000 / T for b in SD_BETAS)  # prior.schedule scales the T = 1000 endpoints by 1000/T
    got = (float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02)))
    if kind == "linear" or not all(math.isclose(g, w, rel_tol=1e-9) for g, w in zip(got, want)):
        raise ConfigError(
            f"{where}: beta_schedule {kind!r} from {got[0]} to {got[1]} over {T} steps; latentdiff imports "
            f"Stable Diffusion's scaled_linear from {want[0]:g} to {want[1]:g}"
        )
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise ConfigError(f"{where}: prediction_type {prediction!r} is not one of {', '.join(PREDICTIONS)}")
    clip = bool(config.get("clip_sample", False))
    return DiffusionConfig(
        schedule="scaled_linear",
        timesteps=T,
        prediction=PREDICTIONS[prediction],
        zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)),
        clip_x0=float(config.get("clip_sample_range", 1.0)) if clip else "off",
    )


# ---------------------------------------------------------------- a diffusers folder


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"{path} is missing: put {what} there (as StableDiffusionPipeline.save_pretrained writes it)")
    return path


def read_folder(src: Path) -> Pipeline:
    """A diffusers StableDiffusionPipeline folder, read and checked (see the module docstring)."""
    index = src / "model_index.json"
    components = _json(index) if index.is_file() else {}
    if "text_encoder_2" in components or (src / "text_encoder_2").exists():
        raise UserError(
            f"{src} has a second text encoder (text_encoder_2: SDXL-style); latentdiff imports SD 1.x/2.x "
            "pipelines with one CLIP text encoder"
        )
    cls = components.get("_class_name", "StableDiffusionPipeline")
    if cls != "StableDiffusionPipeline":
        raise UserError(f"{index} describes a {cls}; latentdiff imports a StableDiffusionPipeline")
    for part, what in FOLDER_PARTS.items():
        _need(src / part, f"{what} in a folder {part}/")
    unet_dir = src / "unet"
    unet_json = _json(_need(unet_dir / "config.json", f"{FOLDER_PARTS['unet']}'s config.json"))
    unet = config_from_diffusers(unet_json, str(unet_dir / "config.json"))
    files = diffusers_weights(unet_dir)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(read_tensor_file(_need(f, "the shard its index lists"), "the UNet's weights"))
    state = from_diffusers(tensors, unet, str(files[0]) if len(files) == 1 else f"{unet_dir} ({len(files)} shards)")
    text = read_diffusers(src)
    scheduler = src / "scheduler" / "scheduler_config.json"
    diffusion = diffusion_from_scheduler(_json(_need(scheduler, FOLDER_PARTS["scheduler"])), str(scheduler))
    vae_json = _json(_need(src / "vae" / "config.json", f"{FOLDER_PARTS['vae']}'s config.json"))
    downsampling = 2 ** (len(vae_json.get("block_out_channels", [0])) - 1)
    sample = unet_json.get("sample_size", 64)
    return Pipeline(
        src,
        "diffusers",
        "sd2" if text.settings.pad == "zero" else "sd1",  # the tokenizer's padding: "!" is OpenCLIP's (SD 2.x)
        unet,
        state,
        diffusion,
        text,
        src / "vae",
        None,
        int(sample if isinstance(sample, int) else sample[0]) * downsampling,
    )


# ---------------------------------------------------------------- a single file


def unet_config_from_ldm(state: dict[str, torch.Tensor], family: str, where: str) -> dict[str, Any]:
    """The diffusers config.json of an LDM-named UNet (no `model.diffusion_model.`), read off its shapes.

    What the weights do not show is the family's: heads (SD 1.x: 8 per level; SD 2.x: width / 64),
    32 GroupNorm groups, eps 1e-5. Raises UserError (one line) for a layout that is not SD's.
    """
    if "input_blocks.0.0.weight" not in state or "time_embed.0.weight" not in state:
        raise UserError(f"{where} has no UNet in LDM's layout (no {LDM_UNET_PREFIX}input_blocks.0.0.weight)")
    levels: list[list[bool]] = [[]]  # per level, per ResBlock: whether a transformer follows it
    widths: list[int] = []
    n = 1
    while f"input_blocks.{n}.0.op.weight" in state or f"input_blocks.{n}.0.in_layers.2.weight" in state:
        if f"input_blocks.{n}.0.op.weight" in state:
            levels.append([])
        else:
            if not levels[-1]:
                widths.append(int(state[f"input_blocks.{n}.0.out_layers.3.weight"].shape[0]))
            levels[-1].append(f"input_blocks.{n}.1.proj_in.weight" in state)
        n += 1
    per = {len(level) for level in levels}
    attends = [all(level) for level in levels]
    if len(per) != 1 or any(any(level) != all(level) for level in levels):
        raise UserError(f"{where}: the UNet's levels differ in ResBlocks or attention; not an SD 1.x/2.x UNet")
    proj = next((v for k, v in state.items() if k.endswith(".proj_in.weight")), None)
    to_k = next((v for k, v in state.items() if k.endswith("attn2.to_k.weight")), None)
    if proj is None or to_k is None:
        raise UserError(f"{where}: the UNet has no cross-attention; not an SD 1.x/2.x UNet")
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends]
    return {
        "in_channels": int(state["input_blocks.0.0.weight"].shape[1]),
        "out_channels": int(state["out.2.weight"].shape[0]) if "out.2.weight" in state else 4,
        "block_out_channels": widths,
        "layers_per_block": per.pop(),
        "down_block_types": down,
        "up_block_types": [
            "CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D" for t in reversed(down)
        ],
        "cross_attention_dim": int(to_k.shape[1]),
        "attention_head_dim": 8 if family == "sd1" else [w // 64 for w in widths],  # sic: heads
        "use_linear_projection": proj.dim() == 2,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
    }


def read_file(
    src: Path,
    prediction: Prediction | None,
    resolution: int | None,
    unet_config: dict[str, Any] | None = None,
    text_config: dict[str, Any] | None = None,
) -> Pipeline:
    """A single-file SD 1.x / 2.x checkpoint, read and checked (see the module docstring).

    prediction: what the UNet predicts (a file does not say): eps for SD 1.x by default; SD 2.x
    needs it (2.x-base: eps, 768-v: v). resolution: default 512 (768 for a v model).
    unet_config (a diffusers UNet config.json) and text_config (an open_clip model config) stand
    in for the family's full-size layouts, for smaller models of the same layout (tests).
    """
    tensors = read_tensor_file(src, "a Stable Diffusion checkpoint")
    if any(k.startswith("conditioner.embedders.") for k in tensors):
        raise UserError(
            f"{src} is SDXL-style (conditioner.embedders.*: two text encoders); latentdiff imports SD 1.x/2.x"
        )
    unet_tensors = {k[len(LDM_UNET_PREFIX) :]: v for k, v in tensors.items() if k.startswith(LDM_UNET_PREFIX)}
    text = read_single_file(src, state=tensors, model_config=text_config)
    family = "sd1" if text.settings.layer == "last" else "sd2"
    if prediction is None and family == "sd2":
        raise UserError(
            f"{src} is SD 2.x, whose file does not say what its UNet predicts: pass --prediction eps (2.x-base, "
            "512 px) or --prediction v (2.x 768-v)"
        )
    prediction = prediction or "eps"
    config = unet_config or unet_config_from_ldm(unet_tensors, family, str(src))
    unet = config_from_diffusers(config, f"{src}'s UNet")
    state = from_ldm(unet_tensors, unet, f"{src} ({LDM_UNET_PREFIX})")
    diffusion = DiffusionConfig(schedule="scaled_linear", timesteps=1000, prediction=prediction, clip_x0="off")
    side = resolution or (768 if prediction == "v" else 512)
    return Pipeline(src, "single-file", family, unet, state, diffusion, text, src, SD_SCALING_FACTOR, side)


# ---------------------------------------------------------------- writing the runs


def import_pipeline(
    src: str | Path,
    out: str | Path,
    data: str,
    *,
    prediction: Prediction | None = None,
    resolution: int | None = None,
    batch_size: int = 4,
    batches: int = 4,
    device: torch.device | str = "cpu",
    unet_config: dict[str, Any] | None = None,
    text_config: dict[str, Any] | None = None,
) -> dict:
    """Write `src` (an SD pipeline folder or single file) as runs out/autoencoder, out/text, out/prior.

    data: shards on which the autoencoder import measures the latent std and range (`batches` of
    `batch_size` images). prediction, resolution: for a single file (read_file); a folder's
    scheduler and UNet config say them. Returns a summary. Raises UserError, ConfigError or
    CheckpointError (one line); nothing is written when the source does not fit, and what was written
    is removed when a later step fails (the error is raised again).
    """
    src, out = Path(src), Path(out)
    if not src.exists():
        raise UserError(
            f"{src} does not exist: give a diffusers StableDiffusionPipeline folder or an SD checkpoint file"
        )
    taken = [p for p in (out / "autoencoder", out / "text", out / "prior") if p.exists()]
    if taken:
        raise UserError(f"{taken[0]} already exists; choose another --out")
    if src.is_dir():
        if prediction is not None or unet_config is not None or text_config is not None:
            raise UserError(f"{src} is a folder: its scheduler_config.json and config.json files say the settings")
        pipe = read_folder(src)
        side = resolution or pipe.resolution
    else:
        pipe = read_file(src, prediction, resolution, unet_config, text_config)
        side = pipe.resolution
    if pipe.unet.context_dim != pipe.text.width:
        raise UserError(
            f"{src}: the UNet cross-attends to width {pipe.unet.context_dim}, "
            f"but the text encoder gives {pipe.text.width}"
        )
    created = not out.exists()
    try:
        return _write_runs(pipe, out, side, data, batch_size, batches, device)
    except BaseException:
        # What was written is removed (the three run folders did not exist before: checked above), so a failed
        # import can be run again as it was; --out itself goes too when this import made it and it is empty.
        for run in (out / "autoencoder", out / "text", out / "prior"):
            shutil.rmtree(run, ignore_errors=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _write_runs(
    pipe: Pipeline, out: Path, side: int, data: str, batch_size: int, batches: int, device: torch.device | str
) -> dict:
    """The three runs of `pipe` under `out` (see import_pipeline); a summary."""
    ae = import_autoencoder(
        pipe.vae,
        out / "autoencoder",
        data,
        scaling_factor=pipe.scaling_factor,
        resolution=side,
        batch_size=batch_size,
        batches=batches,
        device=device,
    )
    text_dir = out / "text"
    text_dir.mkdir(parents=True)
    # The open_clip config lives in the run, named relative to it (text.sources.run_model), so the run can move.
    ckpt.write_json(text_dir / TEXT_MODEL_JSON, pipe.text.model_config)
    text_cfg = TextStageConfig(model=TEXT_MODEL_JSON, encoder=pipe.text.settings, image_tower=False)
    imported = {"path": str(pipe.path.resolve()), "format": pipe.format, "family": pipe.family}
    ckpt.write_first_checkpoint(
        text_dir, "text", dumps_toml(to_dict(text_cfg)), pipe.text.model.state_dict(), {"imported_from": imported}
    )
    # The two runs just written, loaded the one way every later stage loads them; the prior records them.
    stages = load_frozen_stages(out / "autoencoder", text_dir, torch.device("cpu"))
    prior_cfg = PriorConfig(
        model=pipe.unet,
        diffusion=pipe.diffusion,
        sampling=SamplingConfig(guidance=SD_GUIDANCE),
        resolution=stages.latent_space.resolution,
    )
    prior_dir = out / "prior"
    prior_dir.mkdir(parents=True)
    meta = {**stage_records(stages, prior_dir), "imported_from": imported}
    ckpt.write_first_checkpoint(prior_dir, "prior", dumps_toml(to_dict(prior_cfg)), pipe.unet_state, meta)
    return {
        "out": str(out),
        "format": pipe.format,
        "family": pipe.family,
        "resolution": stages.latent_space.resolution,
        "scale_factor": ae["scale_factor"],
        "prediction": pipe.diffusion.prediction,
        "text_layer": pipe.text.settings.layer,
        "unet_parameters": sum(v.numel() for v in pipe.unet_state.values()),
    }
