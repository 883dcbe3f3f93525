"""Where a TextEncoder comes from: an open_clip pretrained checkpoint, or a `latentdiff train text` run.

    load_text_encoder("openclip:ViT-B-32:laion2b_s34b_b79k")         a tag, from the local cache
    load_text_encoder("openclip:clip-tiny:/path/weights.safetensors")  a local file
    load_text_encoder("runs/text")                                      a text-stage run directory

Nothing here downloads unless asked (`download=True`): a tag that is not in the cache stops at
once with a message naming the file it looked for. (open_clip itself would retry the network
for ~45 s before failing with a generic error.)
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import load_file

from latentdiff.core import checkpoint as ckpt

from latentdiff.text.encoder import TextEncoder
from latentdiff.text.model import build_clip, load_model_config, register_configs, validate_model_config
from latentdiff.text.tokens import build_tokenizer

SPEC_PREFIX = "openclip:"
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def parse_spec(spec: str) -> tuple[str, str]:
    """'openclip:MODEL:PRETRAINED' -> (MODEL, PRETRAINED); PRETRAINED may itself contain ':'."""
    if not spec.startswith(SPEC_PREFIX):
        raise ValueError(f"{spec!r} is not an open_clip spec; expected openclip:MODEL:PRETRAINED")
    model_name, sep, pretrained = spec[len(SPEC_PREFIX):].partition(":")
    if not model_name or not sep or not pretrained:
        raise ValueError(
            f"{spec!r}: expected openclip:MODEL:PRETRAINED, e.g. openclip:ViT-B-32:laion2b_s34b_b79k "
            "or openclip:clip-tiny:/path/open_clip_model.safetensors"
        )
    return model_name, pretrained


def _cached_tag_file(tag_cfg: dict[str, Any], cache_dir: str | None) -> tuple[str | None, list[str]]:
    """The local file of a pretrained tag if already cached, else None; plus the places looked at.

    Mirrors open_clip's download_pretrained: the HF hub entry is preferred (its .safetensors
    alternative first), then the URL download in cache_dir or ~/.cache/clip.
    """
    looked: list[str] = []
    if tag_cfg.get("file"):
        return (tag_cfg["file"] if os.path.isfile(tag_cfg["file"]) else None), [tag_cfg["file"]]
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import constants, try_to_load_from_cache
        except ImportError:
            pass
        else:
            repo_id, filename = os.path.split(hub)
            filename = filename or "open_clip_pytorch_model.bin"
            candidates = ["open_clip_model.safetensors"] if filename == "open_clip_pytorch_model.bin" else []
            if filename.endswith((".bin", ".pth")) and filename != "open_clip_pytorch_model.bin":
                candidates.append(filename[:-4] + ".safetensors")
            candidates.append(filename)
            root = cache_dir or constants.HF_HUB_CACHE
            for name in candidates:
                found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
                if isinstance(found, str):
                    return found, looked
                looked.append(os.path.join(root, "models--" + repo_id.replace("/", "--"), "snapshots", "*", name))
    url = tag_cfg.get("url", "")
    if url:
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(path):
            return path, looked
        looked.append(path)
    return None, looked


def load_pretrained(
    model_name: str, pretrained: str, *, cache_dir: str | None = None, download: bool = False
) -> TextEncoder:
    """TextEncoder from open_clip: `model_name` (open_clip or ours, e.g. "clip-tiny") with weights
    `pretrained`, a local .pt/.bin/.safetensors file or an open_clip tag found in the local cache.

    With download=False (the default) a tag missing from the cache raises FileNotFoundError at once.
    """
    register_configs()
    model_config = load_model_config(model_name)  # also rejects HF text towers before any loading
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"{model_name!r} is not an open_clip model name (ours: clip-tiny, clip-base; see open_clip.list_models())"
        )
    spec = f"{SPEC_PREFIX}{model_name}:{pretrained}"
    force_preprocess: dict[str, Any] = {}
    if os.path.isfile(pretrained):
        weights = pretrained
    elif open_clip.is_pretrained_cfg(model_name, pretrained):
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        weights, looked = _cached_tag_file(tag_cfg, cache_dir)
        if weights is None and download:
            weights = pretrained  # let open_clip download it
        elif weights is None:
            where = " or ".join(looked) or "(no download location in open_clip's table)"
            raise FileNotFoundError(
                f"open_clip {model_name} {pretrained!r} is not in the cache ({where}); download it on a "
                f"machine with internet (python -c \"import open_clip; open_clip.create_model('{model_name}', "
                f"pretrained='{pretrained}')\") and copy the cache, or pass the local file: "
                f"--text openclip:{model_name}:/path/open_clip_pytorch_model.bin"
            )
        force_preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
        if tag_cfg.get("quick_gelu", False) != model_config.get("quick_gelu", False):
            warnings.warn(
                f"open_clip {model_name} {pretrained!r} was trained with quick_gelu={tag_cfg.get('quick_gelu', False)} "
                f"but the config uses quick_gelu={model_config.get('quick_gelu', False)}; use the "
                f"'{model_name}-quickgelu' config if one exists",
                UserWarning,
                stacklevel=2,
            )
    elif os.sep in pretrained or "/" in pretrained or pretrained.endswith(_WEIGHT_SUFFIXES):
        raise FileNotFoundError(f"pretrained weights file {pretrained} does not exist or is not a file (from {spec})")
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(
            f"{pretrained!r} is neither an existing file nor an open_clip pretrained tag of {model_name} "
            f"(tags: {', '.join(tags) if tags else 'none; pass a weights file'})"
        )
    model = open_clip.create_model(
        model_name, pretrained=weights, cache_dir=cache_dir, force_preprocess_cfg=force_preprocess or None
    )
    return TextEncoder(model, build_tokenizer(model_config), model_config=model_config, source=spec)


# ---- text-stage run directories ------------------------------------------------------------
# What core.train.Run.save writes for the text stage: meta.json ({"stage": "text", "model_config":
# {...}, "ema": bool, ...}), model.safetensors (open_clip CLIP state-dict keys) and
# ema.safetensors when meta says "ema": true, read through core.checkpoint like every run.


def _not_a_text_run(run_dir: Path, why: str) -> str:
    return f"{run_dir} {why}; pass the run directory of `latentdiff train text` or openclip:MODEL:PRETRAINED"


def load_run_weights(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(meta, state_dict, model_config) of a text-stage run; the EMA weights when the run kept them."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(_not_a_text_run(run_dir, "is not a directory"))
    if not (run_dir / ckpt.META).is_file() and not ckpt.has_checkpoint(run_dir):
        raise FileNotFoundError(_not_a_text_run(run_dir, "has no meta.json, so it is not a latentdiff run"))
    meta = ckpt.read_meta(run_dir)
    stage = meta.get("stage")
    if stage != "text":
        raise ValueError(_not_a_text_run(run_dir, f"is a {stage} run, not a text encoder run"))
    if "model_config" not in meta:
        raise ValueError(f"{run_dir / ckpt.META} has no model_config, so the model cannot be rebuilt")
    model_config = validate_model_config(meta["model_config"], where=f"{run_dir / ckpt.META} model_config")
    ema = ckpt.committed_file(run_dir, ckpt.EMA)
    weights = ema if meta.get("ema") and ema.is_file() else ckpt.committed_file(run_dir, ckpt.MODEL)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: the text run in {run_dir} has no saved weights")
    return meta, load_file(weights, device="cpu"), model_config


def save_text_run_weights(run_dir: str | Path, model: open_clip.CLIP, model_config: dict[str, Any]) -> Path:
    """Write a text run of `model` that load_run_weights reads: one committed checkpoint of step 0, no EMA."""
    run_dir = Path(run_dir)
    meta = {"stage": "text", "format_version": ckpt.FORMAT_VERSION, "step": 0, "model_config": model_config,
            "ema": False}
    staging = ckpt.staging_dir(run_dir, 0)
    ckpt.save_weights(staging / ckpt.MODEL, model.state_dict())
    ckpt.write_json(staging / ckpt.META, meta)
    ckpt.commit(run_dir, staging, 0, keep=1)
    ckpt.write_json(run_dir / ckpt.META, meta)
    return run_dir


def load_text_encoder(
    spec_or_run_dir: str | Path, *, cache_dir: str | None = None, frozen: bool = True
) -> TextEncoder:
    """The one way later stages get a text encoder: an openclip:MODEL:PRETRAINED spec or a text run directory.

    frozen=True (the default) returns it with gradients off and in eval mode.
    """
    spec = str(spec_or_run_dir)
    if spec.startswith(SPEC_PREFIX):
        encoder = load_pretrained(*parse_spec(spec), cache_dir=cache_dir)
    else:
        meta, state_dict, model_config = load_run_weights(spec)
        model = build_clip(model_config)
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            raise ValueError(f"weights in {spec} do not fit the model_config in its meta.json: {e}") from e
        encoder = TextEncoder(model, build_tokenizer(model_config), model_config=model_config, source=spec)
    return encoder.frozen() if frozen else encoder
