"""Names and configs of pretrained KL autoencoders: diffusers' AutoencoderKL and LDM / Stable Diffusion files.

latentdiff's Autoencoder expresses the KL-f8 autoencoder of Latent Diffusion (Rombach et al.
2022) exactly when its config asks for LDM's layout (`ldm_layout`). What differs is only the
names of the tensors, so each foreign format is one function from a latentdiff name to the
foreign one; the inverse map is built from the model's own state dict, which makes it a
bijection by construction. Nothing here reads files: see autoencoder/interchange.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace

import torch

from latentdiff.core.checkpoint import CheckpointError
from latentdiff.core.config import ConfigError

from .model import AutoencoderModelConfig

DIFFUSERS_CLASS = "AutoencoderKL"
LDM_PREFIX = "first_stage_model."  # where a single-file SD / LDM checkpoint keeps its autoencoder


def ldm_layout(cfg: AutoencoderModelConfig) -> AutoencoderModelConfig:
    """`cfg` with every layout field set as LDM's and Stable Diffusion's KL autoencoder has it."""
    return replace(
        cfg,
        downsample_padding="asymmetric",
        decoder_res_blocks=cfg.num_res_blocks + 1,
        upsample_narrows=False,
        attention_bias=True,
    )


# ---------------------------------------------------------------- tensor names

# (pattern on a latentdiff name, replacement); the first rule that matches a part of the name applies.
_DIFFUSERS_RULES: list[tuple[str, str]] = [
    (r"^encoder\.quant_conv\.", "quant_conv."),
    (r"^decoder\.post_quant_conv\.", "post_quant_conv."),
    (r"\.down\.(\d+)\.blocks\.", r".down_blocks.\1.resnets."),
    (r"\.down\.(\d+)\.downsample\.", r".down_blocks.\1.downsamplers.0."),
    (r"\.up\.(\d+)\.blocks\.", r".up_blocks.\1.resnets."),
    (r"\.up\.(\d+)\.upsample\.", r".up_blocks.\1.upsamplers.0."),
    (r"\.mid\.(\d)\.", r".mid_block.resnets.\1."),
    (r"\.mid_attn\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid_attn\.attn\.to_out\.", ".mid_block.attentions.0.to_out.0."),
    (r"\.mid_attn\.attn\.", ".mid_block.attentions.0."),
    (r"\.skip\.", ".conv_shortcut."),
    (r"\.norm_out\.", ".conv_norm_out."),
]


# diffusers before 0.14 named an attention block's projections query, key, value and proj_attn; its
# from_pretrained still renames them on load, and hub VAEs saved before then keep them.
_OLD_ATTENTION = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_NEW_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def modern_diffusers_names(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """`state` with diffusers' older attention names replaced by today's (query -> to_q, proj_attn -> to_out.0).

    Returns the renamed state and how many tensors were renamed. A name that exists under both forms is
    left for rename_state to report as a tensor the model does not have.
    """
    out, renamed = {}, 0
    for key, value in state.items():
        m = _OLD_ATTENTION.match(key)
        new = f"{m[1]}{_NEW_ATTENTION[m[2]]}.{m[3]}" if m else key
        if new != key and new not in state:
            key, renamed = new, renamed + 1
        out[key] = value
    return out, renamed


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key, count=1)
    return key


def diffusers_name(key: str) -> str:
    """A latentdiff Autoencoder tensor name -> its name in diffusers' AutoencoderKL state dict."""
    return _rename(key, _DIFFUSERS_RULES)


def ldm_namer(levels: int) -> Callable[[str], str]:
    """latentdiff name -> name in an LDM / SD checkpoint (without `first_stage_model.`).

    LDM numbers the decoder's levels by resolution (up.0 is the image level) where latentdiff
    and diffusers number them in the order they run (up.0 is the latent level).
    """
    rules = [
        (r"^encoder\.quant_conv\.", "quant_conv."),
        (r"^decoder\.post_quant_conv\.", "post_quant_conv."),
        (r"\.down\.(\d+)\.blocks\.", r".down.\1.block."),
        (r"\.up\.(\d+)\.blocks\.", lambda m: f".up.{levels - 1 - int(m[1])}.block."),
        (r"\.up\.(\d+)\.upsample\.", lambda m: f".up.{levels - 1 - int(m[1])}.upsample."),
        (r"\.mid\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}."),
        (r"\.mid_attn\.norm\.", ".mid.attn_1.norm."),
        (r"\.mid_attn\.attn\.to_(q|k|v)\.", r".mid.attn_1.\1."),
        (r"\.mid_attn\.attn\.to_out\.", ".mid.attn_1.proj_out."),
        (r"\.skip\.", ".nin_shortcut."),
    ]
    return lambda key: _rename(key, rules)


def _fit(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """`tensor` in `shape`, allowing only LDM's 1x1-conv attention weights (C, C, 1, 1) for linear ones (C, C)."""
    if tensor.shape == shape:
        return tensor
    extra = tensor.shape[len(shape) :]
    if tensor.shape[: len(shape)] == shape and extra and all(n == 1 for n in extra):
        return tensor.reshape(shape)
    return None


def _examples(names: list[str], n: int = 3) -> str:
    shown = ", ".join(sorted(names)[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def rename_state(
    model_state: dict[str, torch.Tensor],
    source: dict[str, torch.Tensor],
    name: Callable[[str], str],
    where: str,
    what: str,
) -> dict[str, torch.Tensor]:
    """The tensors of `source` under the model's names, checked to be exactly the model's set.

    model_state: the latentdiff model's state dict (names and shapes wanted); name: latentdiff
    name -> source name; what: the architecture, for messages. Raises CheckpointError (one line)
    naming the missing, unused and misshapen tensors.
    """
    wanted = {name(k): k for k in model_state}
    missing = [n for n in wanted if n not in source]
    unused = [n for n in source if n not in wanted]
    out, misshapen = {}, []
    for theirs, ours in wanted.items():
        if theirs not in source:
            continue
        fitted = _fit(source[theirs], model_state[ours].shape)
        if fitted is None:
            misshapen.append(f"{theirs} is {tuple(source[theirs].shape)}, needs {tuple(model_state[ours].shape)}")
        else:
            out[ours] = fitted.to(model_state[ours].dtype).contiguous()
    problems = []
    if misshapen:
        problems.append(f"{len(misshapen)} tensor(s) of another shape ({'; '.join(misshapen[:2])})")
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing ({_examples(missing)})")
    if unused:
        problems.append(f"{len(unused)} tensor(s) it does not have ({_examples(unused)})")
    if problems:
        raise CheckpointError(f"{where} does not match {what}: {'; '.join(problems)}")
    return out


# ---------------------------------------------------------------- configs


def describe(cfg: AutoencoderModelConfig) -> str:
    """A short name of an architecture, for messages."""
    return (
        f"a KL autoencoder with channels {list(cfg.channels)}, {cfg.num_res_blocks} ResBlock(s) per level, "
        f"{cfg.latent_channels} latent channels"
    )


def config_from_diffusers(config: dict, where: str) -> AutoencoderModelConfig:
    """The latentdiff model config of a diffusers AutoencoderKL config.json (its keys as diffusers names them)."""
    cls = config.get("_class_name", DIFFUSERS_CLASS)
    if cls != DIFFUSERS_CLASS:
        raise ConfigError(f"{where} describes a {cls}, not an {DIFFUSERS_CLASS}: only KL autoencoders import")
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "down_block_types", "up_block_types"):
        if key not in config:
            raise ConfigError(f"{where} has no {key!r}: it is not an {DIFFUSERS_CLASS} config")
    channels = tuple(config["block_out_channels"])
    checks = {
        "down_block_types": (config["down_block_types"], ["DownEncoderBlock2D"] * len(channels)),
        "up_block_types": (config["up_block_types"], ["UpDecoderBlock2D"] * len(channels)),
        "act_fn": (config.get("act_fn", "silu"), "silu"),
        "shift_factor": (config.get("shift_factor"), None),  # latentdiff's latent space is z * scale, no shift
        "latents_mean": (config.get("latents_mean"), None),
        "latents_std": (config.get("latents_std"), None),
        "out_channels": (config.get("out_channels", 3), config.get("in_channels", 3)),
    }
    for key, (got, want) in checks.items():
        if (list(got) if isinstance(got, (list, tuple)) else got) != want:
            raise ConfigError(f"{where}: {key} = {got!r} is not supported (latentdiff imports {key} = {want!r})")
    groups = int(config.get("norm_num_groups", 32))
    uneven = [c for c in channels if c % groups]
    if uneven:
        raise ConfigError(f"{where}: norm_num_groups = {groups} does not divide the widths {uneven}")
    layers = int(config["layers_per_block"])
    cfg = AutoencoderModelConfig(
        in_channels=int(config.get("in_channels", 3)),
        channels=channels,
        num_res_blocks=layers,
        latent_channels=int(config["latent_channels"]),
        mid_attention=bool(config.get("mid_block_add_attention", True)),
        norm_groups=groups,
        quant_conv=bool(config.get("use_quant_conv", True)),
        post_quant_conv=bool(config.get("use_post_quant_conv", True)),
    )
    return ldm_layout(cfg)


def config_from_ldm(state: dict[str, torch.Tensor], where: str) -> AutoencoderModelConfig:
    """The model config of an LDM-named autoencoder state dict (no `first_stage_model.`), read off its shapes.

    LDM's Normalize is always GroupNorm(32, C, eps=1e-6), so norm_groups is 32 (not in the weights).
    """
    if "encoder.conv_in.weight" not in state or "decoder.conv_in.weight" not in state:
        raise CheckpointError(
            f"{where} holds no KL autoencoder: no tensor encoder.conv_in.weight and "
            f"decoder.conv_in.weight (under {LDM_PREFIX} in a full checkpoint)"
        )
    levels = 0
    while f"encoder.down.{levels}.block.0.conv1.weight" in state:
        levels += 1

    def count(prefix: str) -> int:
        n = 0
        while f"{prefix}.{n}.conv1.weight" in state:
            n += 1
        return n

    if levels == 0:
        raise CheckpointError(f"{where} has no encoder.down.0.block.0.conv1.weight: not an LDM KL autoencoder")
    channels = tuple(int(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels))
    res_blocks = count("encoder.down.0.block")
    cfg = AutoencoderModelConfig(
        in_channels=int(state["encoder.conv_in.weight"].shape[1]),
        channels=channels,
        num_res_blocks=res_blocks,
        latent_channels=int(state["decoder.conv_in.weight"].shape[1]),
        mid_attention="encoder.mid.attn_1.q.weight" in state,
        norm_groups=32,
        quant_conv="quant_conv.weight" in state,
        post_quant_conv="post_quant_conv.weight" in state,
    )
    cfg = ldm_layout(cfg)
    cfg = replace(
        cfg,
        decoder_res_blocks=count("decoder.up.0.block") or cfg.decoder_res_blocks,
        attention_bias="encoder.mid.attn_1.q.bias" in state or not cfg.mid_attention,
    )
    uneven = [c for c in channels if c % 32]
    if uneven:
        raise CheckpointError(f"{where}: widths {uneven} are not multiples of LDM's 32 GroupNorm groups")
    return cfg


def export_problems(cfg: AutoencoderModelConfig) -> list[str]:
    """Why `cfg` cannot be written as a diffusers AutoencoderKL (empty when it can)."""
    problems = []
    if cfg.downsample_padding != "asymmetric":
        problems.append(f"model.downsample_padding = {cfg.downsample_padding!r} (diffusers pads 'asymmetric')")
    if cfg.decoder_config().num_res_blocks != cfg.num_res_blocks + 1:
        problems.append(
            f"the decoder has {cfg.decoder_config().num_res_blocks} ResBlocks per level "
            f"(diffusers: num_res_blocks + 1 = {cfg.num_res_blocks + 1})"
        )
    if cfg.upsample_narrows:
        problems.append("model.upsample_narrows = true (diffusers narrows in the next ResBlock)")
    if cfg.mid_attention and not cfg.attention_bias:
        problems.append("model.attention_bias = false (diffusers' attention has q, k, v biases)")
    uneven = [c for c in cfg.channels if c % cfg.norm_groups]
    if uneven:
        problems.append(f"model.norm_groups = {cfg.norm_groups} does not divide the widths {uneven}")
    return problems


def diffusers_config(cfg: AutoencoderModelConfig, scaling_factor: float, resolution: int) -> dict:
    """config.json of the diffusers AutoencoderKL that `cfg` is (see export_problems first)."""
    levels = len(cfg.channels)
    return {
        "_class_name": DIFFUSERS_CLASS,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(cfg.channels),
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": resolution,
        "scaling_factor": scaling_factor,
        "shift_factor": None,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": cfg.quant_conv,
        "use_post_quant_conv": cfg.post_quant_conv,
        "mid_block_add_attention": cfg.mid_attention,
    }
