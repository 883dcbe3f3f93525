"""The prior's UNet in and out of diffusers: UNet2DConditionModel configs and state dicts, both directions.

latentdiff's UNet is exactly diffusers' UNet2DConditionModel of Stable Diffusion 1.x and 2.x
(Rombach et al. 2022, App. E.2) when its config asks for that layout (the `base` preset). What
differs is how the two are written down:
- the config: diffusers' `attention_head_dim` is in fact the number of heads (8 for SD 1.x,
  [5, 10, 20, 20] for SD 2.x, i.e. 64 wide; diffusers keeps the misnomer for old configs), and
  its block types say which levels attend, where latentdiff lists the levels;
- the tensor names: latentdiff keeps the down and up paths as flat lists of layers, diffusers
  groups them per level (`down_blocks.1.resnets.0`, `up_blocks.2.attentions.1`).
The name map is one function from a latentdiff name to diffusers'; the inverse is built from the
model's own state dict, so it is a bijection by construction. What both share without a field
here: the sinusoidal time embedding (cos then sin, frequencies 10000^(-i/half): diffusers'
flip_sin_to_cos = true, freq_shift = 0), a time MLP 4x the first width, padded-by-one strided-conv
downsampling and nearest-then-conv upsampling, GEGLU feed-forwards 4x wide, transformers' GroupNorm
eps 1e-6. Nothing here reads files: the import and export commands do.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from latentdiff.autoencoder.convert import rename_state
from latentdiff.core.config import ConfigError

from .unet import UNet, UNetConfig

DIFFUSERS_CLASS = "UNet2DConditionModel"
CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"

# diffusers options latentdiff's UNet has no counterpart for, with the one value it expresses (diffusers'
# default, which SD 1.x and 2.x keep). A key absent from a config.json takes diffusers' default too.
_FIXED: dict[str, Any] = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
# diffusers' defaults for the keys that map onto latentdiff fields (its UNet2DConditionModel.__init__).
_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": [CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN],
    "up_block_types": [PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP],
    "cross_attention_dim": 1280,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "dropout": 0.0,
}


def describe(cfg: UNetConfig) -> str:
    """A short name of an architecture, for messages."""
    heads = list(cfg.heads) if isinstance(cfg.heads, tuple) else cfg.heads
    return (
        f"a UNet with channels {list(cfg.channels)}, {cfg.num_res_blocks} ResBlock(s) per level, attention at "
        f"levels {list(cfg.attention_levels)}, heads {heads}, context width {cfg.context_dim}, "
        f"{cfg.projection} projections"
    )


# ---------------------------------------------------------------- tensor names

# Inside one layer (a latentdiff UNetLayer is a diffusers resnet, then maybe its attention, at the same index).
_LAYER_RULES: list[tuple[str, str]] = [
    (r"^res\.emb\.", "time_emb_proj."),
    (r"^res\.skip\.", "conv_shortcut."),
    (r"^res\.", ""),
    (r"\.self_attn\.", ".attn1."),
    (r"\.cross_attn\.", ".attn2."),
    (r"\.to_out\.", ".to_out.0."),
    (r"\.ff\.proj_in\.", ".ff.net.0.proj."),
    (r"\.ff\.proj_out\.", ".ff.net.2."),
    (r"^attn\.block\.", "transformer_blocks.0."),
    (r"^attn\.", ""),
]


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key, count=1)
    return key


def diffusers_namer(cfg: UNetConfig) -> Callable[[str], str]:
    """latentdiff UNet tensor name -> its name in diffusers' UNet2DConditionModel state dict.

    The down path is `num_res_blocks` layers per level, then a Downsample (all levels but the
    last); the up path, from the last level back, is `num_res_blocks + 1` layers, then an
    Upsample (all but level 0). diffusers' up_blocks.0 is latentdiff's last level.
    """
    per_down, per_up = cfg.num_res_blocks + 1, cfg.num_res_blocks + 2

    def layer(prefix: str, index: int, rest: str) -> str:
        kind = "attentions" if rest.startswith("attn.") else "resnets"
        return f"{prefix}.{kind}.{index}.{_rename(rest, _LAYER_RULES)}"

    def name(key: str) -> str:
        head, _, rest = key.partition(".")
        if head == "time_embed":  # Sequential(Linear, SiLU, Linear): linear_1 is 0, linear_2 is 2
            index, _, rest = rest.partition(".")
            return f"time_embedding.linear_{int(index) // 2 + 1}.{rest}"
        if head == "norm_out":
            return f"conv_norm_out.{rest}"
        if head not in ("down", "up", "mid"):
            return key  # conv_in, conv_out
        index, _, rest = rest.partition(".")
        if head == "mid":  # [ResBlock + transformer, ResBlock]: one transformer, so attentions.0
            return layer("mid_block", 0 if rest.startswith("attn.") else int(index), rest)
        level, i = divmod(int(index), per_down if head == "down" else per_up)
        if rest.startswith("conv."):  # the Downsample or Upsample that ends a level
            return f"{head}_blocks.{level}.{head}samplers.0.{rest}"
        return layer(f"{head}_blocks.{level}", i, rest)

    return name


# Inside a resnet: diffusers' name -> LDM's (ResBlock's Sequentials: in_layers = [norm, SiLU, conv], emb_layers =
# [SiLU, linear], out_layers = [norm, SiLU, dropout, conv]). Transformers are named alike in both.
_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_LDM_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
_DIFFUSERS_PART = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)$")


def ldm_namer(cfg: UNetConfig) -> Callable[[str], str]:
    """latentdiff UNet tensor name -> its name in an LDM / SD single-file checkpoint (without `model.diffusion_model.`).

    LDM's openaimodel.UNetModel numbers its layers flat (Rombach et al. 2022's code): input_blocks.0 is
    conv_in, then per level `num_res_blocks` blocks [ResBlock, SpatialTransformer?] and a block holding
    the Downsample (`.0.op`); middle_block is [ResBlock, SpatialTransformer, ResBlock]; output_blocks
    run from the last level back, `num_res_blocks + 1` blocks per level, the level's Upsample (`.conv`)
    sitting after the ResBlock and transformer of its last block; out is [GroupNorm, SiLU, conv].
    Built on `diffusers_namer`: diffusers' per-level groups are renumbered flat.
    """
    to_diffusers_name, per = diffusers_namer(cfg), cfg.num_res_blocks + 1
    levels = len(cfg.channels)

    def resnet(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return f"{_LDM_RESNET[head]}.{tail}"

    def name(key: str) -> str:
        theirs = to_diffusers_name(key)
        for top, ldm in _LDM_TOP.items():
            if theirs.startswith(top + "."):
                return ldm + theirs[len(top) :]
        if theirs.startswith("mid_block."):  # resnets.0 -> 0, attentions.0 -> 1, resnets.1 -> 2
            kind, index, rest = theirs[len("mid_block.") :].split(".", 2)
            if kind == "attentions":
                return f"middle_block.1.{rest}"
            return f"middle_block.{2 * int(index)}.{resnet(rest)}"
        m = _DIFFUSERS_PART.match(theirs)
        if m is None:
            raise ValueError(f"no LDM name for {key} ({theirs})")  # a UNet field this map does not know
        path, block, kind, index, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if path == "down":
            n = 1 + block * per + (cfg.num_res_blocks if kind == "downsamplers" else index)
            if kind == "downsamplers":  # its conv is LDM's Downsample.op
                return f"input_blocks.{n}.0.op.{rest.removeprefix('conv.')}"
            return f"input_blocks.{n}.{1 if kind == 'attentions' else 0}.{resnet(rest) if kind == 'resnets' else rest}"
        n = block * per + (cfg.num_res_blocks if kind == "upsamplers" else index)
        if kind == "upsamplers":  # after the ResBlock, and the transformer where this level attends
            attends = levels - 1 - block in cfg.attention_levels
            return f"output_blocks.{n}.{2 if attends else 1}.{rest}"
        return f"output_blocks.{n}.{1 if kind == 'attentions' else 0}.{resnet(rest) if kind == 'resnets' else rest}"

    return name


def from_ldm(state: dict[str, torch.Tensor], cfg: UNetConfig, where: str) -> dict[str, torch.Tensor]:
    """An LDM / SD single-file UNet state dict (names without `model.diffusion_model.`) under latentdiff's names.

    Raises CheckpointError (one line) naming the missing, unused and misshapen tensors.
    """
    return rename_state(_model_state(cfg), state, ldm_namer(cfg), where, describe(cfg))


def _model_state(cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Names and shapes of the UNet `cfg` builds, without allocating its weights."""
    with torch.device("meta"):
        return UNet(cfg).state_dict()


def from_diffusers(
    state: dict[str, torch.Tensor], cfg: UNetConfig, where: str = "the diffusers UNet"
) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict under latentdiff's names, for a UNet built from `cfg`.

    The tensors are the source's own (no copy when they are already float32 and contiguous).
    Raises CheckpointError (one line) naming the missing, unused and misshapen tensors.
    """
    return rename_state(_model_state(cfg), state, diffusers_namer(cfg), where, describe(cfg))


def to_diffusers(
    state: dict[str, torch.Tensor], cfg: UNetConfig, where: str = "the latentdiff UNet"
) -> dict[str, torch.Tensor]:
    """A latentdiff UNet state dict under diffusers' UNet2DConditionModel names (see export_problems first).

    Raises CheckpointError (one line) when `state` is not the state of the UNet `cfg` builds.
    """
    checked = rename_state(_model_state(cfg), state, lambda key: key, where, describe(cfg))
    name = diffusers_namer(cfg)
    return {name(k): v for k, v in checked.items()}


# ---------------------------------------------------------------- configs


def _one(config: dict, key: str, where: str) -> Any:
    """A per-level diffusers option that latentdiff holds once: an int, or a list of equal ints."""
    value = config.get(key, _DEFAULTS[key])
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"{where}: {key} = {list(value)} differs per level; latentdiff's UNet has one value")
        value = value[0]
    return value


def config_from_diffusers(config: dict, where: str, **fields: Any) -> UNetConfig:
    """The latentdiff UNetConfig of a diffusers UNet2DConditionModel config.json (keys as diffusers names them).

    fields: latentdiff-only settings to pass on (attention, gradient_checkpointing). Raises
    ConfigError (one line) naming the first option latentdiff's UNet cannot express.
    """
    cls = config.get("_class_name", DIFFUSERS_CLASS)
    if cls != DIFFUSERS_CLASS:
        raise ConfigError(f"{where} describes a {cls}, not a {DIFFUSERS_CLASS}: only SD 1.x/2.x-style UNets import")
    for key, want in _FIXED.items():
        got = config.get(key, want)
        if key == "mid_block_only_cross_attention" and got is False:
            continue  # False and None build the same mid block
        if key == "transformer_layers_per_block" and isinstance(got, list) and set(got) == {1}:
            continue
        if got != want:
            raise ConfigError(f"{where}: {key} = {got!r} is not supported (latentdiff imports {key} = {want!r})")
    in_ch, out_ch = config.get("in_channels", 4), config.get("out_channels", 4)
    if in_ch != out_ch:
        raise ConfigError(f"{where}: in_channels {in_ch} != out_channels {out_ch}; latentdiff predicts in kind")
    channels = tuple(int(c) for c in config.get("block_out_channels", _DEFAULTS["block_out_channels"]))
    down = list(config.get("down_block_types", _DEFAULTS["down_block_types"]))
    up = list(config.get("up_block_types", _DEFAULTS["up_block_types"]))
    if len(down) != len(channels) or any(t not in (CROSS_DOWN, PLAIN_DOWN) for t in down):
        raise ConfigError(
            f"{where}: down_block_types {down} is not one of {CROSS_DOWN} / {PLAIN_DOWN} per level of "
            f"block_out_channels {list(channels)}"
        )
    mirrored = [CROSS_UP if t == CROSS_DOWN else PLAIN_UP for t in reversed(down)]
    if up != mirrored:
        raise ConfigError(f"{where}: up_block_types {up} does not mirror down_block_types (latentdiff: {mirrored})")
    heads = config.get("attention_head_dim", _DEFAULTS["attention_head_dim"])  # sic: the number of heads
    groups = config.get("norm_num_groups", _DEFAULTS["norm_num_groups"])
    if not isinstance(groups, int) or any(c % groups for c in channels):
        raise ConfigError(f"{where}: norm_num_groups = {groups!r} does not divide block_out_channels {list(channels)}")
    context = _one(config, "cross_attention_dim", where)
    try:
        return UNetConfig(
            in_channels=int(in_ch),
            channels=channels,
            num_res_blocks=int(_one(config, "layers_per_block", where)),
            attention_levels=tuple(level for level, t in enumerate(down) if t == CROSS_DOWN),
            heads=tuple(int(h) for h in heads) if isinstance(heads, (list, tuple)) else int(heads),
            context_dim=int(context),
            projection="linear" if config.get("use_linear_projection", False) else "conv",
            norm_groups=groups,
            norm_eps=float(config.get("norm_eps", _DEFAULTS["norm_eps"])),
            dropout=float(config.get("dropout", _DEFAULTS["dropout"])),
            **fields,
        )
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def export_problems(cfg: UNetConfig) -> list[str]:
    """Why `cfg` cannot be written as a diffusers UNet2DConditionModel (empty when it can), one phrase each."""
    problems = []
    if cfg.pooled_dim:
        problems.append(f"model.pooled_dim = {cfg.pooled_dim} (diffusers' UNet adds no pooled text embedding)")
    if cfg.context_positions:
        problems.append(
            f"model.context_positions = {cfg.context_positions} (diffusers' UNet adds no positions to the text states)"
        )
    if cfg.context_layers:
        problems.append(f"model.context_layers = {cfg.context_layers} (diffusers' UNet has no layers over the text)")
    # latentdiff takes gcd(norm_groups, width) groups per layer; diffusers takes norm_groups everywhere, so each
    # width a GroupNorm sees (the levels and, on the way up, each level plus its skip) must be a multiple.
    widths = sorted({*cfg.channels, *(a + b for a in cfg.channels for b in cfg.channels)})
    uneven = [w for w in widths if w % cfg.norm_groups]
    if uneven:
        problems.append(
            f"model.norm_groups = {cfg.norm_groups} does not divide the widths {uneven} (diffusers uses "
            "exactly norm_groups groups in every GroupNorm, latentdiff fewer where a width needs it)"
        )
    return problems


def diffusers_config(cfg: UNetConfig, sample_size: int) -> dict[str, Any]:
    """config.json of the diffusers UNet2DConditionModel that `cfg` is (see export_problems first).

    sample_size: the latent side the model was trained at (diffusers' pipelines default to it).
    """
    levels = range(len(cfg.channels))
    down = [CROSS_DOWN if level in cfg.attention_levels else PLAIN_DOWN for level in levels]
    return {
        "_class_name": DIFFUSERS_CLASS,
        "sample_size": sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels,
        "down_block_types": down,
        "up_block_types": [CROSS_UP if t == CROSS_DOWN else PLAIN_UP for t in reversed(down)],
        "block_out_channels": list(cfg.channels),
        "layers_per_block": cfg.num_res_blocks,
        "cross_attention_dim": cfg.context_dim,
        "attention_head_dim": list(cfg.heads) if isinstance(cfg.heads, tuple) else cfg.heads,  # sic: heads
        "use_linear_projection": cfg.projection == "linear",
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": cfg.norm_eps,
        "dropout": cfg.dropout,
        "upcast_attention": False,
        **_FIXED,
    }
