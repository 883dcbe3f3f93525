"""Rebuild a trained autoencoder from its run directory alone (frozen, for later stages), with its latent space."""

from __future__ import annotations

from pathlib import Path

import torch

from latentdiff.core import checkpoint as ckpt
from latentdiff.core.config import dumps_toml, to_dict
from latentdiff.core.latent_space import LatentSpace
from latentdiff.core.runs import LoadedRun, load_run, read_config

from .model import Autoencoder, AutoencoderConfig


def load_autoencoder_run(run_dir: str | Path, device: torch.device | str = "cpu", ema: bool = True) -> LoadedRun:
    """The LoadedRun of `latentdiff train autoencoder --out RUN` (model frozen, in eval mode)."""
    return load_run(
        run_dir,
        "autoencoder",
        AutoencoderConfig,
        lambda cfg, meta: Autoencoder(cfg.model),
        device=device,
        ema=ema,
        needs=("latent_space",),
    )


def read_autoencoder_config(run_dir: str | Path) -> AutoencoderConfig:
    """The config.toml of an autoencoder run (what rebuilds it; the decoder stage derives its network from it)."""
    return read_config(run_dir, AutoencoderConfig)


def load_autoencoder(
    run_dir: str | Path, device: torch.device | str = "cpu", ema: bool = True
) -> tuple[Autoencoder, LatentSpace]:
    """(frozen model, its LatentSpace) from `latentdiff train autoencoder --out RUN`.

    Raises CheckpointError when the weights loaded are not the ones the latent space was measured
    on (another encoder hash: ema=False on a run that kept an EMA, or edited weights).
    """
    run = load_autoencoder_run(run_dir, device, ema)
    space = LatentSpace.from_dict(run.meta["latent_space"], f"{run_dir}/meta.json latent_space")
    loaded = encoder_hash(run.model)
    if loaded != space.encoder_hash:
        raise ckpt.CheckpointError(
            f"the encoder weights loaded from {run_dir} (hash {loaded}) are not the ones its "
            f"latent space was measured on (hash {space.encoder_hash})"
        )
    return run.model, space


def write_autoencoder_run(
    run_dir: str | Path,
    cfg: AutoencoderConfig,
    state: dict[str, torch.Tensor],
    space: LatentSpace,
    extra: dict | None = None,
) -> Path:
    """Write a finished autoencoder run that did not come from training (an imported one).

    One committed checkpoint of step 0 (config.toml, model.safetensors, meta.json; see
    core.checkpoint) and the root copies people read: the files and the meta.json
    "latent_space" that `latentdiff train autoencoder` leaves, so every later command reads the
    run unchanged. extra: further meta keys (where the weights came from, the measuring data).
    Raises CheckpointError if `run_dir` already holds a run; a failed write leaves no checkpoint.
    """
    run_dir = Path(run_dir)
    if (run_dir / ckpt.META).exists() or ckpt.has_checkpoint(run_dir):
        raise ckpt.CheckpointError(f"{run_dir} already holds a run; choose another --out")
    meta = {"latent_space": space.to_dict(), **(extra or {})}
    ckpt.write_first_checkpoint(run_dir, "autoencoder", dumps_toml(to_dict(cfg)), state, meta)
    return run_dir


def encoder_hash(model: Autoencoder) -> str:
    """Content hash of the encoder alone: it fixes the latent space a prior and a decoder rely on."""
    return ckpt.tensors_hash(model.encoder.state_dict())
