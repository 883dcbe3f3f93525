"""Small builders the tests share (not fixtures): runs written by hand where training one would be slow."""

from __future__ import annotations

from pathlib import Path

import open_clip

from latentdiff.core import checkpoint as ckpt
from latentdiff.core.config import dumps_toml, to_dict
from latentdiff.text.stage import TextStageConfig


def write_text_run(run_dir: Path, model: open_clip.CLIP, model_name: str = "clip-tiny") -> Path:
    """A text-stage run directory holding `model`'s weights, laid out as `latentdiff train text` writes one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.write_text(run_dir / ckpt.CONFIG, dumps_toml(to_dict(TextStageConfig(model=model_name))))
    ckpt.save_weights(run_dir / ckpt.MODEL, model.state_dict())
    ckpt.write_json(run_dir / ckpt.META, {"stage": "text", "format_version": ckpt.FORMAT_VERSION, "ema": False})
    return run_dir
