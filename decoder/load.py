"""Rebuild a decoder trained by `latentdiff train decoder` from its run directory alone."""

from __future__ import annotations

from pathlib import Path

import torch

from latentdiff.core.runs import load_run

from .network import Decoder


def load_decoder(run_dir: str | Path, device: torch.device | str = "cpu", ema: bool = True) -> tuple[Decoder, dict]:
    """(frozen decoder in eval mode, meta); meta["encoder_hash"] names the latent space it decodes."""
    from .stage import DecoderStageConfig  # the stage's config is what config.toml holds

    run = load_run(
        run_dir,
        "decoder",
        DecoderStageConfig,
        lambda cfg, meta: Decoder(cfg.model),
        device=device,
        ema=ema,
        needs=("encoder_hash",),
    )
    return run.model, run.meta
