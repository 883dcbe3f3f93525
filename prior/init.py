"""`latentdiff train prior --init RUN`: a new prior run that starts from another prior's weights.

The source is any prior run: one trained here, one `latentdiff import pipeline` wrote (Stable Diffusion),
or a LoRA run (its base with its adapters merged). The new run takes the source's network ([model]) and
diffusion process ([diffusion]), its EMA weights when it kept an EMA, and trains with a fresh optimizer
and lr schedule. It must read the latents and text states the source was trained on: the same checks
as a resume (frozen_stages.check_recorded), each mismatch one line. meta.json records the source
(`init`: path, step, which weights, their content hash); a LoRA run reloads its base from there, and
refuses a base whose weights changed since.

`load_prior` is the one way to load a prior run's UNet, LoRA runs included (TextToImage.from_run uses it).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from latentdiff.core import checkpoint as ckpt
from latentdiff.core.checkpoint import CheckpointError
from latentdiff.core.config import ConfigError, apply_overrides, to_dict
from latentdiff.core.errors import UserError
from latentdiff.core.flags import cli_overrides, config_changes
from latentdiff.core.runs import LoadedRun, find_recorded, load_run, pinned_source, read_config, record_path

from .config import PriorConfig
from .lora import layers_from_adapters, merge
from .unet import UNet

# [model] fields that change how the UNet runs, not its weights: a fine-tune may set them.
RUNTIME_FIELDS = ("gradient_checkpointing", "attention", "dropout")


def load_prior(run: str | Path, *, device: torch.device | str = "cpu", ema: bool = True) -> LoadedRun:
    """A prior run's UNet, frozen (core.runs.load_run); a LoRA run's is its base with its adapters merged (scale 1).

    run: a run directory or one of its checkpoint folders. A LoRA run's base is the one its meta.json
    records under "init" (the checkpoint it pinned, when the base has trained on since), and must still hold
    the weights it recorded (content hash); CheckpointError otherwise.
    """
    run = Path(run)
    meta = ckpt.read_meta(run, "prior")
    if not meta.get("lora"):
        return load_run(run, "prior", PriorConfig, lambda cfg, meta: UNet(cfg.model), device=device, ema=ema)
    owner = _run_of(run)
    base = load_prior(init_source(meta, owner), device=device, ema=meta["init"].get("weights") == "ema")
    check_init_hash(base, meta["init"], owner)
    config = read_config(ckpt.committed_file(run, ckpt.CONFIG).parent, PriorConfig)
    state = ckpt.load_weights(ckpt.committed_file(run, ckpt.EMA if ema and meta.get("ema") else ckpt.MODEL))
    merge(base.model, layers_from_adapters(state, config.lora.alpha), 1.0, str(run))
    return LoadedRun(owner.resolve(), meta, config, base.model, ckpt.tensors_hash(base.model.state_dict()))


def init_source(meta: dict[str, Any], run: Path) -> str:
    """Where the prior `run` (a fine-tune) found its --init source, found from here (UserError when gone)."""
    found = find_recorded(meta["init"], run, "its --init prior", "--init")
    return pinned_source(found, run)


def check_init_hash(base: LoadedRun, record: dict[str, Any], run: Path) -> None:
    if record.get("hash") and base.weights_hash != record["hash"]:
        raise CheckpointError(
            f"{run} was fine-tuned from {record['path']} (weights hash {record['hash']}), but its weights now "
            f"hash {base.weights_hash}; use the prior it was fine-tuned from"
        )


def _run_of(path: Path) -> Path:
    """The run directory of a run or of one of its checkpoint folders."""
    return path.parent.parent if ckpt.is_checkpoint_folder(path) else path


@dataclasses.dataclass(frozen=True)
class InitSource:
    """The prior a new run starts from: its records and config (the weights are read by `load`)."""

    path: Path
    meta: dict[str, Any]
    config: PriorConfig

    @classmethod
    def read(cls, run: str | Path) -> InitSource:
        path = Path(run)
        if not path.is_dir():
            raise UserError(f"--init {run}: no such prior run")
        meta = ckpt.read_meta(path, "prior")
        return cls(path, meta, read_config(ckpt.committed_file(path, ckpt.CONFIG).parent, PriorConfig))

    def load(self, device: torch.device) -> LoadedRun:
        """The source's weights (EMA ones when it kept an EMA), frozen; pinned for the run being trained."""
        return load_prior(self.path, device=device, ema=True)

    def record(self, loaded: LoadedRun, run_dir: Path) -> dict[str, Any]:
        """meta.json's "init": where the source is, its step, which weights, their content hash."""
        return {
            **record_path(self.path, run_dir),
            "step": self.meta.get("step"),
            "weights": "ema" if self.meta.get("ema") else "model",
            "hash": loaded.weights_hash,
        }


def init_config(cfg: PriorConfig, source: InitSource, args: argparse.Namespace, default_preset: str) -> PriorConfig:
    """The new run's config: the preset's, with the source's [model] and [diffusion], then the user's --set on top.

    A [model] that differs from the source's (another --preset, a --set model.X) is refused in one line,
    except the fields that change how the network runs, not its weights (RUNTIME_FIELDS).
    [diffusion] settings given with --set (noise_offset, loss weighting, even the schedule) apply.
    """
    wanted = cfg.model
    cfg = dataclasses.replace(cfg, model=source.config.model, diffusion=source.config.diffusion)
    mine = [o for o in cli_overrides(args) if o.startswith(("model.", "diffusion."))]
    cfg = apply_overrides(cfg, mine) if mine else cfg
    compared = [wanted] if args.preset != default_preset else []
    compared.append(cfg.model)
    for model in compared:
        changes = [
            c
            for c in config_changes(to_dict(source.config.model), to_dict(model), "model.")
            if c.split(":")[0].removeprefix("model.") not in RUNTIME_FIELDS
        ]
        if changes:
            raise ConfigError(
                f"--init {source.path} fine-tunes its UNet, whose [model] differs from the one asked for "
                f"({'; '.join(changes[:3])}); leave out --preset and --set model.* (only "
                f"{', '.join(RUNTIME_FIELDS)} may change)"
            )
    return cfg
