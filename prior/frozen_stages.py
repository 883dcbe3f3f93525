"""The frozen stages a prior is trained with: loading them, checking them, and how a prior run records them.

A prior is only meaningful with the autoencoder whose latent space it learned and the text encoder
whose states it attends to. Its meta.json records both: where they are (absolute and relative to
the run, core.runs.record_path), the LatentSpace it trained on, and the text encoder's content hash.
Resuming the prior and loading it for generation compare them, so a retrained autoencoder, a scale
re-measured on other data, or another text encoder is refused rather than decoded into noise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentdiff.autoencoder.load import load_autoencoder
from latentdiff.autoencoder.model import Autoencoder
from latentdiff.core import checkpoint as ckpt
from latentdiff.core.checkpoint import CheckpointError
from latentdiff.core.config import ConfigError
from latentdiff.core.latent_space import LatentSpace
from latentdiff.core.runs import find_recorded, pinned_source, record_path
from latentdiff.text.encoder import TextEncoder
from latentdiff.text.sources import SPEC_PREFIX, load_text_encoder, parse_spec

from .config import PriorConfig


@dataclass(frozen=True)
class FrozenStages:
    """The autoencoder (and its latent space) and the text encoder a prior reads, frozen."""

    autoencoder: Autoencoder
    latent_space: LatentSpace
    text: TextEncoder
    autoencoder_path: str  # as given, for messages
    text_source: str


def text_hash(encoder: TextEncoder) -> str:
    return ckpt.tensors_hash(encoder.model.state_dict())


def load_frozen_stages(autoencoder: str | Path, text: str | Path, device: torch.device) -> FrozenStages:
    ae, space = load_autoencoder(autoencoder, device)
    encoder = load_text_encoder(str(text)).to(device)
    encoder.frozen(cache_size=4096)
    return FrozenStages(ae, space, encoder, str(autoencoder), str(text))


def stage_records(stages: FrozenStages, run_dir: Path) -> dict[str, Any]:
    """What a prior's meta.json says about its frozen stages (read by `recorded_stages` and `check_recorded`)."""
    return {
        "autoencoder": record_path(stages.autoencoder_path, run_dir),
        "latent_space": stages.latent_space.to_dict(),
        "text": {**_record_text(stages.text_source, run_dir), "hash": text_hash(stages.text)},
    }


SKIP = ""  # recorded_stages: do not look this stage up


def recorded_stages(
    meta: dict[str, Any], run_dir: str | Path, autoencoder: str | Path | None = None, text: str | Path | None = None
) -> tuple[str, str]:
    """(autoencoder, text): the ones given, else the ones the prior run recorded, found from here or from the run.

    Either given as SKIP is not looked up (and returned as ""), so reading one back says nothing of the other.
    """
    recorded_latent_space(meta, run_dir)  # a prior written before latent spaces were recorded stops here
    # A recorded run that has trained on since: the checkpoint the prior was trained with (its pin) instead.
    if autoencoder is None:
        found = find_recorded(meta["autoencoder"], run_dir, "its autoencoder", "--autoencoder")
        autoencoder = pinned_source(found, run_dir)
    if text is None:
        text = pinned_source(_find_text(meta["text"], run_dir), run_dir)
    return str(autoencoder), str(text)


def check_recorded(stages: FrozenStages, meta: dict[str, Any], run_dir: str | Path) -> None:
    """Refuse (CheckpointError, one line) stages other than the ones the prior in `run_dir` was trained with."""
    recorded = recorded_latent_space(meta, run_dir)
    stages.latent_space.check_same(recorded, stages.autoencoder_path, f"the prior {run_dir}")
    want, got = meta["text"]["hash"], text_hash(stages.text)
    if got != want:
        raise CheckpointError(
            f"the prior was trained with text encoder {meta['text']['source']} (hash {want}), "
            f"but {stages.text_source} has hash {got}; use the text encoder the prior was trained with"
        )


def recorded_latent_space(meta: dict[str, Any], run_dir: str | Path) -> LatentSpace:
    """The LatentSpace a prior run trained on (its meta.json)."""
    if meta.get("latent_space") is None:
        raise CheckpointError(f"{run_dir} was written before priors recorded their latent space; train it again")
    return LatentSpace.from_dict(meta["latent_space"], f"{run_dir}/meta.json latent_space")


def check_prior_fits(cfg: PriorConfig, stages: FrozenStages, where: str) -> None:
    """Clear errors for a prior config that cannot read these latents or these text states."""
    unet_cfg, space, encoder = cfg.model, stages.latent_space, stages.text
    if cfg.resolution != space.resolution:
        raise ConfigError(
            f"{where}: the prior is set for {cfg.resolution}-px images, but autoencoder "
            f"{stages.autoencoder_path} encodes {space.resolution}-px ones; "
            f"--set resolution={space.resolution}"
        )
    if unet_cfg.context_dim != encoder.width:
        raise CheckpointError(
            f"{where}: the UNet cross-attends to text width {unet_cfg.context_dim}, "
            f"but the text encoder ({encoder.source}) produces {encoder.width}; "
            f"--set model.context_dim={encoder.width}"
        )
    if unet_cfg.pooled_dim and unet_cfg.pooled_dim != encoder.embed_dim:
        raise CheckpointError(
            f"{where}: the UNet takes a pooled text embedding of width {unet_cfg.pooled_dim}, "
            f"but the text encoder gives {encoder.embed_dim}; "
            f"--set model.pooled_dim={encoder.embed_dim}"
        )
    if unet_cfg.context_positions and unet_cfg.context_positions < encoder.context_length:
        raise ConfigError(
            f"{where}: the UNet embeds the positions of {unet_cfg.context_positions} text tokens, "
            f"but the text encoder gives {encoder.context_length}; "
            f"--set model.context_positions={encoder.context_length}"
        )
    if unet_cfg.in_channels != space.channels:
        raise CheckpointError(
            f"{where}: the UNet has {unet_cfg.in_channels} input channels, but the autoencoder's "
            f"latents have {space.channels}; --set model.in_channels={space.channels}"
        )


def _record_text(source: str, run_dir: Path) -> dict[str, str]:
    """A run directory or an openclip:MODEL:FILE spec is recorded like any path; a cache tag as it is."""
    if source.startswith(SPEC_PREFIX):
        model, pretrained = parse_spec(source)
        if not os.path.isfile(pretrained):
            return {"source": source}
        record = record_path(pretrained, run_dir)
        return {"source": f"{SPEC_PREFIX}{model}:{record['path']}", "from_run": record["from_run"]}
    record = record_path(source, run_dir)
    return {"source": record["path"], "from_run": record["from_run"]}


def _find_text(record: dict[str, str], run_dir: str | Path) -> str:
    source = record["source"]
    if not source.startswith(SPEC_PREFIX):
        return find_recorded({"path": source, **record}, run_dir, "its text encoder", "--text")
    if "from_run" not in record:
        return source
    model, pretrained = parse_spec(source)
    found = find_recorded(
        {"path": pretrained, "from_run": record["from_run"]}, run_dir, "its text encoder weights", "--text"
    )
    return f"{SPEC_PREFIX}{model}:{found}"
