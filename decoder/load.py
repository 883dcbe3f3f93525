"""Rebuild a decoder trained by `latentdiff train decoder` from its run directory alone."""

from __future__ import annotations

from pathlib import Path

import torch

from latentdiff.core import checkpoint as ckpt
from latentdiff.core.config import from_dict

from .network import Decoder, DecoderConfig


def load_decoder(run_dir: str | Path, device: torch.device | str = "cpu", ema: bool = True) -> tuple[Decoder, dict]:
    """(frozen decoder in eval mode, meta); meta["encoder_hash"] names the latent space it decodes."""
    run_dir = Path(run_dir)
    meta = ckpt.read_meta(run_dir, "decoder")
    decoder = Decoder(from_dict(DecoderConfig, meta["decoder_config"], f"{run_dir}/meta.json decoder_config"))
    decoder.load_state_dict(ckpt.load_weights(ckpt.committed_file(run_dir, ckpt.EMA if ema and meta.get("ema") else ckpt.MODEL)))
    return decoder.to(device).eval().requires_grad_(False), meta
