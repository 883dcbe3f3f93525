"""open_clip CLIP models built from our JSON configs, and the image preprocessing they expect.

A model config is the dict open_clip keeps in its own `model_configs/*.json` (embed_dim,
vision_cfg, text_cfg, ...). Ours live in `text/configs/`; they are registered with open_clip
so `open_clip.create_model("clip-tiny", pretrained=path)` works too. The dict is saved in
every text checkpoint, so a run directory alone rebuilds its model. Pretrained weights are read
by `load_clip_weights`, as plain tensors, never by open_clip's own loader.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from latentdiff.core.checkpoint import CheckpointError
from latentdiff.core.safe_load import read_tensor_file

CONFIG_DIR = Path(__file__).parent / "configs"

# Keys CLIP.__init__ accepts from a config (cast_dtype and output_dict are runtime choices);
# `custom_text` is open_clip's switch to CustomTextCLIP, which TextEncoder does not support.
_TOP_KEYS = set(inspect.signature(open_clip.CLIP.__init__).parameters) - {"self", "cast_dtype", "output_dict"}
_VISION_KEYS = {f.name for f in dataclasses.fields(open_clip.CLIPVisionCfg)}
_TEXT_KEYS = {f.name for f in dataclasses.fields(open_clip.CLIPTextCfg)}


def our_model_names() -> list[str]:
    """The config names shipped in text/configs (e.g. "clip-tiny")."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def register_configs() -> None:
    """Make our configs visible to open_clip.create_model / get_model_config (idempotent)."""
    if not all(name in open_clip.list_models() for name in our_model_names()):
        open_clip.add_model_config(CONFIG_DIR)


def validate_model_config(config: dict[str, Any], where: str = "model config") -> dict[str, Any]:
    """Check `config` against open_clip's CLIP schema; return it unchanged or raise ValueError naming the key."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a dict with embed_dim, vision_cfg, text_cfg; got {type(config).__name__}")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; an open_clip config has embed_dim, vision_cfg, text_cfg")
    unknown = sorted(set(config) - _TOP_KEYS - {"custom_text"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
    for section, allowed in (("vision_cfg", _VISION_KEYS), ("text_cfg", _TEXT_KEYS)):
        if not isinstance(config[section], dict):
            raise ValueError(f"{where}: {section} must be a table/dict, got {config[section]!r}")
        unknown = sorted(set(config[section]) - allowed)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} in {section}")
    text_cfg = config["text_cfg"]
    # The per-token states are read from open_clip's own text transformer; an HF text tower
    # (CustomTextCLIP) has a different layout and an HF tokenizer needs a download.
    if config.get("custom_text") or text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise ValueError(
            f"{where}: uses a Hugging Face text tower or tokenizer (custom_text / hf_model_name / "
            "hf_tokenizer_name); latentdiff's TextEncoder supports open_clip.CLIP models with the "
            "built-in text transformer and SimpleTokenizer"
        )
    return config


def load_model_config(name_or_path: str | Path) -> dict[str, Any]:
    """Read a model config: a .json path, one of our names ("clip-tiny"), or an open_clip built-in name."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"model config file {path} does not exist")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        return validate_model_config(config, where=str(path))
    name = str(name_or_path)
    if name.startswith(("hf-hub:", "local-dir:")):
        # open_clip would fetch hf-hub configs over the network; latentdiff stays offline.
        raise ValueError(
            f"{name!r}: hf-hub:/local-dir: model names are not supported; pass a config name or .json file"
        )
    ours = CONFIG_DIR / f"{name}.json"
    if ours.is_file():
        with open(ours, encoding="utf-8") as f:
            return validate_model_config(json.load(f), where=str(ours))
    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(
            f"unknown model config {name!r}: not a .json file, not one of ours {our_model_names()}, "
            "and not an open_clip model (see open_clip.list_models())"
        )
    return validate_model_config(config, where=f"open_clip config {name}")


# CLIP.__init__ always builds an image tower; a text-only model gets this smallest one, then drops it.
_NO_IMAGE_TOWER = {"image_size": 1, "patch_size": 1, "width": 8, "head_width": 8, "layers": 0}


def build_clip(config: dict[str, Any], *, image_tower: bool = True) -> open_clip.CLIP:
    """Build a randomly initialised fp32 open_clip.CLIP from a validated model config.

    image_tower=False builds the text tower only (`model.visual` is None, no visual.* tensors):
    Stable Diffusion's checkpoints keep CLIP's text tower alone, and ViT-H/14's image tower would
    be 630M parameters built for nothing.
    """
    config = validate_model_config(config)
    kwargs = {k: v for k, v in config.items() if k != "custom_text"}
    if not image_tower:
        kwargs["vision_cfg"] = _NO_IMAGE_TOWER
        model = open_clip.CLIP(**kwargs)
        model.visual = None
        return model
    model = open_clip.CLIP(**kwargs)
    # create_model attaches the preprocessing config; do the same so encode_image and
    # get_model_preprocess_cfg behave alike for both construction paths.
    open_clip.set_model_preprocess_cfg(
        model,
        {
            "size": model.visual.image_size,
            "mean": OPENAI_DATASET_MEAN,
            "std": OPENAI_DATASET_STD,
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    )
    return model


def load_clip_weights(model: open_clip.CLIP, path: str | Path, name: str) -> None:
    """Fill `model` (built from config `name`) with an open_clip checkpoint file, read only as tensors.

    Takes open_clip's release files (.safetensors, or .bin/.pt state dicts) and its training
    checkpoints (weights under "state_dict", "module." from DDP). The file is read by
    core.safe_load, never by open_clip, whose loader unpickles with torch's default in older
    releases (weights_only=False before torch 2.6). Raises FileNotFoundError, or CheckpointError
    (one line) for a file that holds code or tensors of another model.
    """
    state = read_tensor_file(path, f"open_clip weights for {name}")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    load_clip_state(model, state, f"{path} does not fit the open_clip model {name}")


def load_clip_state(model: open_clip.CLIP, state: dict[str, torch.Tensor], refusal: str) -> None:
    """Load open_clip-named tensors into `model` strictly; else CheckpointError "REFUSAL: what is missing/extra"."""
    own = model.state_dict()
    # open_clip releases store logit_scale either as a 0-d tensor or with shape (1,).
    if "logit_scale" in state and state["logit_scale"].numel() == own["logit_scale"].numel() == 1:
        state["logit_scale"] = state["logit_scale"].reshape(own["logit_scale"].shape)
    missing = [k for k in own if k not in state]
    unused = [k for k in state if k not in own]
    misshapen = [f"{k} is {tuple(v.shape)}, needs {tuple(own[k].shape)}" for k, v in state.items()
                 if k in own and v.shape != own[k].shape]  # fmt: skip
    problems = [f"{len(missing)} tensor(s) missing ({', '.join(missing[:3])})"] if missing else []
    problems += [f"{len(unused)} it does not have ({', '.join(unused[:3])})"] if unused else []
    if problems or misshapen:
        raise CheckpointError(f"{refusal}: {'; '.join(problems + misshapen[:2])}")
    model.load_state_dict(state, strict=True)


def image_size(model: open_clip.CLIP) -> tuple[int, int]:
    """(H, W) the image tower was built for."""
    size = model.visual.image_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def preprocess_images(images: torch.Tensor, model: open_clip.CLIP) -> torch.Tensor:
    """Map reader images (B, C, H, W) in [-1, 1] to the model's input: [0, 1], resized, mean/std-normalised.

    One-channel images (e.g. Fashion-MNIST) are repeated to three channels, as CLIP's
    preprocessing does when it converts grayscale images to RGB.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 3, H, W) or (B, 1, H, W) in [-1, 1], got {tuple(images.shape)}")
    if images.dtype == torch.uint8:  # reader batches are uint8: (x + 1) / 2 of them would be silently wrong
        raise TypeError("expected images in [-1, 1], got uint8 pixels; convert them with core.pixels.from_uint8_to")
    param = next(model.visual.parameters())
    x = (images.to(device=param.device, dtype=torch.float32) + 1) / 2  # [-1, 1] -> [0, 1]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    size = image_size(model)
    if tuple(x.shape[-2:]) != size:
        # antialias so downsizing a 256px sample for a 32px tower does not alias;
        # clamp because bicubic overshoots, which PIL resizing of uint8 images cannot do.
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    cfg = open_clip.get_model_preprocess_cfg(model)
    mean = torch.tensor(cfg.get("mean", OPENAI_DATASET_MEAN), device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", OPENAI_DATASET_STD), device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(param.dtype)  # (B, 3, H', W')
