"""Rebuild a trained autoencoder from its run directory alone (frozen, for later stages)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from latentdiff.core import checkpoint as ckpt
from latentdiff.core.config import dumps_toml, load_toml, to_dict

from .model import Autoencoder, AutoencoderConfig


def load_autoencoder(run_dir: str | Path, device: torch.device | str = "cpu",
                     ema: bool = True) -> tuple[Autoencoder, dict]:
    """(model in eval mode with frozen weights, meta) from `latentdiff train autoencoder --out RUN`.

    meta carries what later stages need: scale_factor (1 / latent std), latent_absmax,
    downsampling, and weights_hash, the content hash of the weights that were loaded.
    """
    run_dir = Path(run_dir)
    meta = ckpt.read_meta(run_dir, "autoencoder")
    if "scale_factor" not in meta:
        raise ckpt.CheckpointError(f"{run_dir} has no latent scale factor yet: its training did not finish; "
                                   f"resume it with `latentdiff train autoencoder --resume {run_dir}`")
    cfg = load_toml(AutoencoderConfig, ckpt.committed_file(run_dir, ckpt.CONFIG))
    model = Autoencoder(cfg.model)
    path = ckpt.committed_file(run_dir, ckpt.EMA if ema and meta.get("ema") else ckpt.MODEL)
    state = ckpt.load_weights(path)
    model.load_state_dict(state)
    model.to(device).eval().requires_grad_(False)
    meta = {**meta, "weights_hash": ckpt.tensors_hash(state), "encoder_hash": encoder_hash(model),
            "run_dir": str(run_dir.resolve()), "config": cfg}
    return model, meta


def write_autoencoder_run(run_dir: str | Path, cfg: AutoencoderConfig, state: dict[str, torch.Tensor],
                          latent: dict, extra: dict | None = None) -> Path:
    """Write a finished autoencoder run that did not come from training (an imported one).

    One committed checkpoint of step 0 (config.toml, model.safetensors, meta.json; see
    core.checkpoint) and the root copies people read: the files and meta keys that `latentdiff
    train autoencoder` leaves, so every later command reads the run unchanged. latent: the
    latent-space facts as the stage records them (scale_factor, latent_std, latent_absmax,
    resolution, latent_channels, downsampling); extra: where the weights came from. Raises
    CheckpointError if `run_dir` already holds a run; a failed write leaves no checkpoint.
    """
    run_dir = Path(run_dir)
    if (run_dir / ckpt.META).exists() or ckpt.has_checkpoint(run_dir):
        raise ckpt.CheckpointError(f"{run_dir} already holds a run; choose another --out")
    config = dumps_toml(to_dict(cfg))
    meta = {"stage": "autoencoder", "format_version": ckpt.FORMAT_VERSION, "step": 0, "ema": False,
            **latent, **(extra or {})}
    staging = ckpt.staging_dir(run_dir, 0)
    try:
        ckpt.write_text(staging / ckpt.CONFIG, config)
        ckpt.save_weights(staging / ckpt.MODEL, state, {"step": 0})
        ckpt.write_json(staging / ckpt.META, meta)
        ckpt.commit(run_dir, staging, 0, keep=1)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    ckpt.write_text(run_dir / ckpt.CONFIG, config)
    ckpt.write_json(run_dir / ckpt.META, meta)
    return run_dir


def encoder_hash(model: Autoencoder) -> str:
    """Content hash of the encoder alone: it fixes the latent space a prior and a decoder rely on."""
    return ckpt.tensors_hash(model.encoder.state_dict())
