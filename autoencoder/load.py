"""Rebuild a trained autoencoder from its run directory alone (frozen, for later stages)."""

from __future__ import annotations

from pathlib import Path

import torch

from latentdiff.core import checkpoint as ckpt
from latentdiff.core.config import load_toml

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


def encoder_hash(model: Autoencoder) -> str:
    """Content hash of the encoder alone: it fixes the latent space a prior and a decoder rely on."""
    return ckpt.tensors_hash(model.encoder.state_dict())
