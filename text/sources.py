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

from latentdiff.core.checkpoint import CheckpointError
from latentdiff.core.runs import load_run
from latentdiff.text.encoder import TextEncoder
from latentdiff.text.model import build_clip, load_clip_weights, load_model_config, register_configs
from latentdiff.text.tokens import build_tokenizer

SPEC_PREFIX = "openclip:"
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def parse_spec(spec: str) -> tuple[str, str]:
    """'openclip:MODEL:PRETRAINED' -> (MODEL, PRETRAINED); PRETRAINED may itself contain ':'."""
    if not spec.startswith(SPEC_PREFIX):
        raise ValueError(f"{spec!r} is not an open_clip spec; expected openclip:MODEL:PRETRAINED")
    model_name, sep, pretrained = spec[len(SPEC_PREFIX) :].partition(":")
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
            weights = open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir) or None  # fetched only: read below
        if weights is None:
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
    # Built without weights, then filled from tensors we read: open_clip never unpickles the file.
    model = open_clip.create_model(model_name, pretrained=None, force_preprocess_cfg=force_preprocess or None)
    load_clip_weights(model, weights, model_name)
    return TextEncoder(model, build_tokenizer(model_config), model_config=model_config, source=spec)


# ---- text-stage run directories ------------------------------------------------------------


def run_model(model: str, run_dir: str | Path) -> str:
    """The model config a text run records, with a relative .json path read from the run directory (an imported
    run keeps its open_clip config beside its weights: the run can move, and loads from any working directory)."""
    if model.endswith(".json") and not Path(model).is_absolute():
        return str(Path(run_dir) / model)
    return model


def load_text_run(run_dir: str | Path) -> TextEncoder:
    """The TextEncoder of a `latentdiff train text` run (EMA weights when it kept them), through core.runs.load_run."""
    from .stage import TextStageConfig  # what the run's config.toml holds

    def build(cfg: TextStageConfig, meta: dict) -> open_clip.CLIP:
        return build_clip(load_model_config(run_model(cfg.model, run_dir)), image_tower=cfg.image_tower)

    try:
        run = load_run(run_dir, "text", TextStageConfig, build)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (or a pretrained open_clip model: openclip:MODEL:PRETRAINED)") from None
    cfg = run.config
    model_config = load_model_config(run_model(cfg.model, run_dir))
    tokenizer = build_tokenizer(model_config)
    return TextEncoder(run.model, tokenizer, model_config=model_config, source=str(run_dir), settings=cfg.encoder)


def load_text_encoder(spec_or_run_dir: str | Path, *, cache_dir: str | None = None) -> TextEncoder:
    """The one way later stages get a text encoder: an openclip:MODEL:PRETRAINED spec or a text run directory.

    It is returned frozen: gradients off, eval mode.
    """
    spec = str(spec_or_run_dir)
    if spec.startswith(SPEC_PREFIX):
        encoder = load_pretrained(*parse_spec(spec), cache_dir=cache_dir)
    else:
        encoder = load_text_run(spec)
    return encoder.frozen()
