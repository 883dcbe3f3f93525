"""Small builders the tests share (not fixtures): runs written by hand where training one would be slow."""

from __future__ import annotations

from pathlib import Path

import open_clip

from latentdiff.core import checkpoint as ckpt
from latentdiff.core.config import dumps_toml, to_dict
from latentdiff.text.stage import TextStageConfig


def write_text_run(run_dir: Path, model: open_clip.CLIP, model_name: str = "clip-tiny") -> Path:
    """A text-stage run holding `model`'s weights as one committed checkpoint of step 0, as `latentdiff train text`
    writes one (config.toml names the open_clip model config; no EMA)."""
    meta = {"stage": "text", "format_version": ckpt.FORMAT_VERSION, "step": 0, "ema": False}
    config = dumps_toml(to_dict(TextStageConfig(model=model_name)))
    staging = ckpt.staging_dir(run_dir, 0)
    ckpt.save_weights(staging / ckpt.MODEL, model.state_dict())
    ckpt.write_text(staging / ckpt.CONFIG, config)
    ckpt.write_json(staging / ckpt.META, meta)
    ckpt.commit(run_dir, staging, 0, keep=1)
    ckpt.write_text(run_dir / ckpt.CONFIG, config)
    ckpt.write_json(run_dir / ckpt.META, meta)
    return run_dir


def tensorboard_images(run_dir: Path) -> dict[str, list]:
    """The images of a run's TensorBoard event files, by tag: [(step, width, height, encoded PNG)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    return {tag: [(e.step, e.width, e.height, e.encoded_image_string) for e in events.Images(tag)]
            for tag in events.Tags()["images"]}


def decoded(encoded: bytes):
    """An encoded image (PNG bytes) as an (H, W, 3) uint8 array."""
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
