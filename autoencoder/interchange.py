"""Pretrained KL autoencoders in and out: `latentdiff import autoencoder` and `latentdiff export autoencoder`.

A source is one of
- a diffusers model folder: config.json + the weights as diffusers writes them:
  diffusion_pytorch_model.safetensors (or .bin), a variant such as diffusion_pytorch_model.fp16.safetensors
  (half-precision weights are upcast to float32), or shards with their .index.json; the attention
  names of diffusers before 0.14 (query, key, value, proj_attn) are read as today's. A pipeline
  folder works too: its vae/ subfolder is used;
- a single-file Stable Diffusion / Latent Diffusion checkpoint in safetensors, the autoencoder's
  tensors under `first_stage_model.` (or a standalone VAE file, with them at the top level).
Every file is read by core.safe_load: a pickle (.ckpt, .pt, .bin) only through
`torch.load(weights_only=True)`, so one that needs code to unpickle is refused. The import writes an
ordinary autoencoder run directory (autoencoder.load.write_autoencoder_run), so every later command
reads it unchanged.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from latentdiff.core import checkpoint as ckpt
from latentdiff.core.checkpoint import CheckpointError
from latentdiff.core.config import ConfigError
from latentdiff.core.errors import UserError
from latentdiff.core.latent_space import LatentSpace
from latentdiff.core.runs import record_path
from latentdiff.core.safe_load import read_tensor_file
from latentdiff.core.train import TrainConfig
from latentdiff.data.reader import make_loader

from .convert import (
    LDM_PREFIX,
    config_from_diffusers,
    config_from_ldm,
    describe,
    diffusers_config,
    diffusers_name,
    export_problems,
    ldm_namer,
    modern_diffusers_names,
    rename_state,
)
from .load import encoder_hash, load_autoencoder, read_autoencoder_config, write_autoencoder_run
from .model import Autoencoder, AutoencoderConfig, AutoencoderModelConfig
from .stage import measure_latents

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# diffusers' names for a model's weights: diffusion_pytorch_model[.VARIANT].EXT, or shards listed in
# diffusion_pytorch_model.EXT.index[.VARIANT].json (its _add_variant puts the variant before the last suffix).
_WEIGHTS_FILE = re.compile(r"^diffusion_pytorch_model(?:\.(?P<variant>[^.]+))?\.(?P<ext>safetensors|bin)$")
_SHARD_INDEX = re.compile(r"^diffusion_pytorch_model\.(?P<ext>safetensors|bin)\.index(?:\.(?P<variant>[^.]+))?\.json$")


@dataclass(frozen=True)
class Source:
    """A pretrained autoencoder, read and renamed: what an import needs."""

    path: Path
    format: str  # "diffusers" (a model folder) or "single-file" (an SD / LDM checkpoint)
    model: AutoencoderModelConfig
    state: dict[str, torch.Tensor]  # under latentdiff's names, checked against `model`
    scaling_factor: float | None  # the source's own latent scale, if it records one
    sample_size: int | None  # the image side the source was configured for, if it records one
    weights: tuple[str, ...]  # the file name(s) the tensors came from
    stored_dtype: str  # the dtype the file stores ("float16" for an fp16 variant); the run is float32
    notes: tuple[str, ...] = ()  # what the import changed on the way, for the log line


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or of a pickle read through torch.load(weights_only=True).

    A pickle's tensors may sit under "state_dict" (LDM's .ckpt). Raises CheckpointError (one line)
    for a file that is neither, or a pickle that would need code to load (core.safe_load).
    """
    return read_tensor_file(path, "a KL autoencoder's weights")


def diffusers_weights(folder: Path, variant: str | None = None) -> list[Path]:
    """The weight file(s) of a diffusers model folder, as diffusers' from_pretrained would pick them.

    Without `variant`: the full-precision file, else the one variant present (e.g. only
    diffusion_pytorch_model.fp16.safetensors). safetensors before .bin, one file before shards.
    Raises UserError (one line) naming the files and variants found when there is no single choice.
    """
    found: dict[str | None, list[tuple[int, Path]]] = {}
    for f in folder.iterdir():
        for rank, pattern in ((0, _WEIGHTS_FILE), (2, _SHARD_INDEX)):
            m = pattern.match(f.name)
            if m and f.is_file():
                # safetensors before bin; a single file before an index of shards
                found.setdefault(m["variant"], []).append((rank + (m["ext"] == "bin"), f))
    variants = sorted(v for v in found if v is not None)
    listed = ", ".join(variants)
    if variant is not None and variant not in found:
        raise UserError(
            f"{folder} has no weights of variant {variant!r} (diffusion_pytorch_model.{variant}.safetensors or "
            f".bin); variants present: {listed or 'none'}"
        )
    if variant is None and None not in found:
        if not variants:
            raise UserError(
                f"{folder} has no diffusers weights: no {' or '.join(DIFFUSERS_WEIGHTS)}, no variant such as "
                "diffusion_pytorch_model.fp16.safetensors, no .index.json of shards"
            )
        if len(variants) > 1:
            raise UserError(f"{folder} has weights in variants {listed} and no full-precision file: pass --variant")
        variant = variants[0]
    chosen = min(found[variant])[1]
    if not _SHARD_INDEX.match(chosen.name):
        return [chosen]
    try:
        weight_map = json.loads(chosen.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{chosen} is not a diffusers shard index (no weight_map: {e})") from None
    names = sorted(set(weight_map.values()))
    elsewhere = [n for n in names if not isinstance(n, str) or Path(n).name != n]
    if elsewhere:  # shards live beside their index; a path elsewhere is not diffusers' layout
        raise ConfigError(f"{chosen} lists shards outside its folder ({elsewhere[0]!r})")
    return [folder / name for name in names]


def _read_diffusers_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise UserError(f"{f} is missing: its shard index lists it")
        tensors.update(read_tensors(f))
    return tensors


def _diffusers_folder(src: Path) -> Path | None:
    for folder in (src, src / "vae"):
        if (folder / DIFFUSERS_CONFIG).is_file():
            return folder
    return None


def _model_state(cfg: AutoencoderModelConfig) -> dict[str, torch.Tensor]:
    """Names and shapes of the model `cfg` builds, without allocating its weights."""
    with torch.device("meta"):
        return Autoencoder(cfg).state_dict()


def _stored_dtype(tensors: dict[str, torch.Tensor]) -> str:
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in tensors.values() if v.is_floating_point()})
    return "/".join(dtypes) or "none"


def read_source(src: str | Path, variant: str | None = None) -> Source:
    """Read and check a pretrained autoencoder (see the module docstring for the forms).

    variant: which diffusers weights variant to read ("fp16"), when a folder holds several.
    """
    src = Path(src)
    if not src.exists():
        raise UserError(f"{src} does not exist: give a diffusers model folder or a checkpoint file")
    if src.is_dir():
        folder = _diffusers_folder(src)
        if folder is None:
            raise UserError(f"{src} is a folder without {DIFFUSERS_CONFIG}: not a diffusers model folder")
        try:
            config = json.loads((folder / DIFFUSERS_CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{folder / DIFFUSERS_CONFIG} is not valid JSON ({e})") from None
        cfg = config_from_diffusers(config, str(folder / DIFFUSERS_CONFIG))
        files = diffusers_weights(folder, variant)
        tensors, old_names = modern_diffusers_names(_read_diffusers_weights(files))
        where = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"
        state = rename_state(
            _model_state(cfg), tensors, diffusers_name, where, f"{describe(cfg)} (from {DIFFUSERS_CONFIG})"
        )
        notes = (f"{old_names} tensors under diffusers' older attention names (query, key, value, proj_attn) read",)
        scale = config.get("scaling_factor")
        return Source(
            folder,
            "diffusers",
            cfg,
            state,
            None if scale is None else float(scale),
            config.get("sample_size") if isinstance(config.get("sample_size"), int) else None,
            tuple(f.name for f in files),
            _stored_dtype(tensors),
            notes if old_names else (),
        )
    if variant is not None:
        raise UserError(f"--variant {variant} is for a diffusers folder; {src} is a single file")
    tensors = read_tensors(src)
    if any(k.startswith(LDM_PREFIX) for k in tensors):
        tensors = {k[len(LDM_PREFIX) :]: v for k, v in tensors.items() if k.startswith(LDM_PREFIX)}
    if "encoder.down.0.blocks.0.conv1.weight" in tensors:
        raise UserError(
            f"{src} holds latentdiff's own tensor names: it is a latentdiff run's weights, which later "
            "commands read from its run directory without an import"
        )
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in tensors:
        raise UserError(
            f"{src} uses diffusers' tensor names: put it in a folder beside its {DIFFUSERS_CONFIG} "
            f"as {DIFFUSERS_WEIGHTS[0]} and import the folder"
        )
    cfg = config_from_ldm(tensors, str(src))
    state = rename_state(
        _model_state(cfg), tensors, ldm_namer(len(cfg.channels)), str(src), f"{describe(cfg)} (read off its shapes)"
    )
    return Source(src, "single-file", cfg, state, None, None, (src.name,), _stored_dtype(tensors))


def _measure(model: Autoencoder, data: str, cfg: AutoencoderConfig, device: torch.device) -> tuple[float, float]:
    """(std, max |z|) of z ~ q(z|x) on training images, as the autoencoder stage measures them."""
    loader = make_loader(
        data,
        "train",
        cfg.train.batch_size,
        seed=cfg.train.seed + 1,
        rank=0,
        world_size=1,
        resolution=cfg.resolution,
        device=device,
    )
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.train.seed)
        std, absmax_over_std = measure_latents(model, iter(loader), cfg.scale_batches, device)
    return std, absmax_over_std * std


def import_autoencoder(
    src: str | Path,
    out: str | Path,
    data: str,
    *,
    scale: str = "source",
    scaling_factor: float | None = None,
    resolution: int | None = None,
    batch_size: int = 8,
    batches: int = 16,
    device: torch.device | str = "cpu",
    variant: str | None = None,
) -> dict:
    """Turn a pretrained KL autoencoder into a latentdiff autoencoder run at `out`; returns a summary.

    data: training shards, encoded as the autoencoder stage does after training, to measure the
    latent std and range (`batches` batches of `batch_size` images at `resolution`), written into
    the run's LatentSpace (core.latent_space) as a trained run's is. scale:
    "source" takes the latent scale from the source's config (`scaling_factor`, 0.18215 for SD
    1.x/2.x) or from `scaling_factor` when given; "data" takes 1 / std as a trained run does (LDM
    §4.3.2). absmax (max |z| in scaled units, the samplers' clip bound) is measured either way.
    resolution: the image side later stages train at (default: the source's sample_size, else 256).
    variant: the diffusers weights variant to read ("fp16") when a folder holds several; weights stored
    in another precision are upcast to the run's float32, and the summary's `notes` say so.
    Raises UserError, ConfigError or CheckpointError (one line); writes nothing then.
    """
    if scale not in ("source", "data"):
        raise UserError(f"--scale {scale!r}: choose source or data")
    source = read_source(src, variant)
    factor = scaling_factor if scaling_factor is not None else source.scaling_factor
    if scale == "source" and factor is None:
        raise UserError(
            f"{source.path} records no scaling_factor: pass --scaling-factor (0.18215 for Stable "
            "Diffusion 1.x/2.x's VAE) or --scale data to measure it"
        )
    side = resolution or source.sample_size or 256
    if side % source.model.downsampling:
        raise UserError(f"resolution {side} is not a multiple of the downsampling factor {source.model.downsampling}")
    # Nothing was trained (meta.json says step 0); batch_size and scale_batches are what measured the latents.
    cfg = AutoencoderConfig(
        model=source.model, resolution=side, scale_batches=batches, train=TrainConfig(batch_size=batch_size)
    )
    device = torch.device(device)
    with torch.device("meta"):  # no random initialisation of weights about to be replaced (84M for SD's VAE)
        model = Autoencoder(cfg.model)
    model.load_state_dict(source.state, assign=True)
    model.to(device).eval().requires_grad_(False)
    std, absmax = _measure(model, data, cfg, device)
    if scale == "data":
        factor = 1.0 / std
    scale_from = "data" if scale == "data" else ("argument" if scaling_factor is not None else "config")
    space = LatentSpace(
        scale=float(factor),
        absmax=absmax * factor,
        channels=cfg.model.latent_channels,
        downsampling=cfg.model.downsampling,
        resolution=side,
        encoder_hash=encoder_hash(model),
    )
    extra = {
        "data": record_path(data, out),
        "latent_std": std,
        "scale_from": scale_from,
        "imported_from": {
            "path": str(source.path.resolve()),
            "format": source.format,
            "weights": list(source.weights),
            "stored_dtype": source.stored_dtype,
        },
    }
    notes = list(source.notes)
    if source.stored_dtype != "float32":
        notes.insert(0, f"{source.stored_dtype} weights upcast to float32")
    run = write_autoencoder_run(out, cfg, source.state, space, extra)
    return {
        "run": str(run),
        "format": source.format,
        "channels": list(cfg.model.channels),
        "scale_factor": space.scale,
        "scale_from": scale_from,
        "latent_std": std,
        "latent_absmax": space.absmax,
        "resolution": side,
        "latent_channels": space.channels,
        "downsampling": space.downsampling,
        "weights": list(source.weights),
        "stored_dtype": source.stored_dtype,
        "notes": notes,
    }


def export_autoencoder(run: str | Path, out: str | Path) -> dict:
    """Write autoencoder run `run` as a diffusers AutoencoderKL model folder at `out` (config.json + weights).

    Raises CheckpointError (one line) when the run's architecture is not one diffusers can build,
    naming the config fields that differ, and UserError when `out` already holds a model.
    """
    out = Path(out)
    if (out / DIFFUSERS_CONFIG).exists():
        raise UserError(f"{out} already holds {DIFFUSERS_CONFIG}; choose another --out")
    model, space = load_autoencoder(run)
    cfg = read_autoencoder_config(run)
    problems = export_problems(cfg.model)
    if problems:
        raise CheckpointError(
            f"{run} cannot be written as a diffusers AutoencoderKL: {'; '.join(problems)} "
            "(train with --preset base, Stable Diffusion's layout, to export)"
        )
    state = {diffusers_name(k): v for k, v in model.state_dict().items()}
    config = diffusers_config(cfg.model, space.scale, space.resolution)
    ckpt.save_weights(out / DIFFUSERS_WEIGHTS[0], state, {"format": "pt"})
    ckpt.write_json(out / DIFFUSERS_CONFIG, config)
    return {"out": str(out), "scaling_factor": config["scaling_factor"], "tensors": len(state)}
