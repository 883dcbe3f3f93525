"""The prior's UNet is diffusers' UNet2DConditionModel of Stable Diffusion 1.x and 2.x, by config.

diffusers (a test-only dependency) is the reference: its UNet2DConditionModel with random weights
from SD-1-style and SD-2-style configs (small ones, and SD 1.5's full layout once). Nothing is
downloaded. The tiny preset's checks pin today's network against the code before these fields.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
import torch

from latentdiff.core.checkpoint import CheckpointError
from latentdiff.core.config import ConfigError, load_preset
from latentdiff.prior.config import PriorConfig
from latentdiff.prior.interchange import (
    config_from_diffusers,
    diffusers_config,
    export_problems,
    from_diffusers,
    to_diffusers,
)
from latentdiff.prior.stage import PRESETS
from latentdiff.prior.unet import UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")

SD1_TYPES = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
# Stable Diffusion 1.5's unet/config.json (860M parameters): 8 heads per level, 1x1-conv projections.
SD15 = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    **SD1_TYPES,
)
# Stable Diffusion 2.1's: heads of width 64 ([5, 10, 20, 20]), linear projections, OpenCLIP ViT-H's 1024.
SD21 = dict(
    SD15, sample_size=96, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True
)
# The same two families at toy sizes: one attending level, one not; the middle block takes the last level's heads.
SMALL_TYPES = dict(
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")
)
SD1_SMALL = dict(
    block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=24, norm_num_groups=8, attention_head_dim=2
)
SD2_SMALL = dict(SD1_SMALL, attention_head_dim=[1, 4], use_linear_projection=True, layers_per_block=2)
# Attention at both levels (the last one too, which SD never does) and another group count.
ALL_ATTEND = dict(
    block_out_channels=(16, 32),
    layers_per_block=1,
    cross_attention_dim=8,
    norm_num_groups=4,
    attention_head_dim=4,
    down_block_types=("CrossAttnDownBlock2D",) * 2,
    up_block_types=("CrossAttnUpBlock2D",) * 2,
)
FAMILIES = {"sd1": dict(SD1_SMALL, **SMALL_TYPES), "sd2": dict(SD2_SMALL, **SMALL_TYPES), "all-attend": ALL_ATTEND}


def diffusers_unet(config: dict, seed: int = 0):
    """A diffusers UNet with every parameter random and non-trivial (its norms' too, so a swapped name shows)."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return unet


def inputs(context_dim: int, side: int = 16, batch: int = 2, tokens: int = 7):
    g = torch.Generator().manual_seed(123)
    z = torch.randn(batch, 4, side, side, generator=g)
    t = torch.tensor([3.0, 999.0, 500.5, 0.0][:batch])  # ends, a fractional one
    return z, t, torch.randn(batch, tokens, context_dim, generator=g)


def ours_from(unet) -> tuple[UNet, UNetConfig]:
    cfg = config_from_diffusers(dict(unet.config), "test config", attention="sdpa")
    model = UNet(cfg).eval()
    model.load_state_dict(from_diffusers(unet.state_dict(), cfg))
    return model, cfg


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_equals_diffusers(family):
    theirs = diffusers_unet(FAMILIES[family])
    ours, cfg = ours_from(theirs)
    z, t, c = inputs(cfg.context_dim)
    with torch.no_grad():
        want = theirs(z, t, encoder_hidden_states=c).sample
        got = ours(z, t, c)
    assert want.abs().max() > 0.5  # not a model that outputs ~0 whatever it holds
    assert (got - want).abs().max() <= 1e-5


def test_configs_map_both_ways():
    sd2 = config_from_diffusers(dict(diffusers_unet(FAMILIES["sd2"]).config), "sd2")
    assert sd2.heads == (1, 4) and sd2.projection == "linear" and sd2.norm_eps == 1e-5 and sd2.num_res_blocks == 2
    assert sd2.attention_levels == (0,) and sd2.norm_groups == 8 and sd2.context_dim == 24
    for config in FAMILIES.values():
        cfg = config_from_diffusers(dict(diffusers_unet(config).config), "test config")
        # our config -> diffusers' config.json -> a diffusers model -> our config again
        rebuilt = diffusers.UNet2DConditionModel.from_config(diffusers_config(cfg, sample_size=16))
        assert config_from_diffusers(dict(rebuilt.config), "rebuilt") == cfg
        for key, value in config.items():
            got = rebuilt.config[key]
            assert (list(got) if isinstance(got, (list, tuple)) else got) == (
                list(value) if isinstance(value, (list, tuple)) else value
            ), key


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trips_bit_for_bit(family):
    theirs = diffusers_unet(FAMILIES[family])
    ours, cfg = ours_from(theirs)
    # diffusers -> ours -> diffusers: every tensor, every name
    back = to_diffusers(ours.state_dict(), cfg)
    assert back.keys() == theirs.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in theirs.state_dict().items())
    # ours (its own initialisation, then perturbed) -> diffusers (loaded strictly) -> ours
    torch.manual_seed(1)
    fresh = UNet(cfg)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    other = diffusers.UNet2DConditionModel.from_config(diffusers_config(cfg, sample_size=16))
    other.load_state_dict(to_diffusers(fresh.state_dict(), cfg))  # strict: diffusers knows every name
    again = from_diffusers(other.state_dict(), cfg)
    assert again.keys() == fresh.state_dict().keys()
    assert all(torch.equal(again[k], v) for k, v in fresh.state_dict().items())


def test_a_state_dict_that_does_not_fit_is_refused_naming_tensors():
    sd1, sd2 = diffusers_unet(FAMILIES["sd1"]), diffusers_unet(FAMILIES["sd2"])
    cfg1 = config_from_diffusers(dict(sd1.config), "sd1")
    state = dict(sd1.state_dict())
    del state["mid_block.attentions.0.proj_in.weight"]
    state["add_embedding.linear_1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        from_diffusers(state, cfg1, "unet/diffusion_pytorch_model.safetensors")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("unet/diffusion_pytorch_model.safetensors does not match a UNet")
    assert "mid_block.attentions.0.proj_in.weight" in msg and "add_embedding.linear_1.weight" in msg
    # SD 2's weights for SD 1's layout: other shapes (more ResBlocks, linear projections), named
    with pytest.raises(
        CheckpointError, match=r"another shape .*down_blocks.0.attentions.0.proj_in.weight is \(32, 32\)"
    ):
        from_diffusers(sd2.state_dict(), cfg1)
    # and our side: a state that is not the UNet of the config
    ours = UNet(cfg1).state_dict()
    ours.pop("conv_out.bias")
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) missing \(conv_out.bias\)"):
        to_diffusers(ours, cfg1)


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(class_embed_type="timestep"), "class_embed_type = 'timestep' is not supported"),
        (dict(freq_shift=1), "freq_shift = 1 is not supported"),
        (dict(transformer_layers_per_block=2), "transformer_layers_per_block = 2"),
        (dict(up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")), "does not mirror down_block_types"),
        (dict(layers_per_block=[1, 2]), "layers_per_block = [1, 2] differs per level"),
        (dict(attention_head_dim=3), "heads 3 does not divide the attention widths: 32 by 3"),
        (dict(_class_name="UNet2DModel"), "describes a UNet2DModel"),
        (dict(out_channels=8), "in_channels 4 != out_channels 8"),
    ],
)
def test_configs_diffusers_has_but_we_do_not_are_refused_in_one_line(change, named):
    config = dict(diffusers_config(config_from_diffusers(dict(SD1_SMALL, **SMALL_TYPES), "x"), 16), **change)
    with pytest.raises(ConfigError) as e:
        config_from_diffusers(config, "unet/config.json")
    assert named in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("unet/config.json")


def test_heads_per_level_are_checked():
    assert UNetConfig(channels=(32, 64), heads=(2, 8)).level_heads(1) == 8
    with pytest.raises(ConfigError, match="names 3 levels but channels has 2"):
        UNetConfig(channels=(32, 64), heads=(1, 2, 4))
    with pytest.raises(ConfigError, match="64 by 6"):  # the middle block attends at the last level's width
        UNetConfig(channels=(32, 64), attention_levels=(0,), heads=(2, 6))


def test_base_preset_is_stable_diffusion_1_5():
    base = load_preset(PriorConfig, PRESETS, "base").model
    sd15 = config_from_diffusers(SD15, "SD 1.5's config.json")
    assert base == sd15 and not export_problems(base)
    sd21 = config_from_diffusers(SD21, "SD 2.1's config.json")
    assert sd21.heads == (5, 10, 20, 20) and sd21.projection == "linear" and sd21.context_dim == 1024
    assert replace(sd21, heads=8, projection="conv", context_dim=768) == base


# The tiny preset's network as it was before the SD fields (computed at d809627 with tiny_fingerprint below,
# the code before this change): its tensor names and shapes, its seed-0 initialisation, one forward with every
# weight random. A change to the tiny network changes one of them. Since 2026-12-06 the preset sets
# model.norm_groups = 16 (a layout diffusers can build); norm_groups = 32 gives back the network before it,
# which runs trained before then still record and must still build.
TINY_NAMES_SHA256 = "e8f2959f74c7ab03f2838753c44fb24bf21b40ed16933623b0155498794f4060"
TINY_INIT_SHA256 = "ad5402d626a3c17b41b9f0164b4937ca05e8846a9a49f067b3682080f98ee148"
TINY_OUT = (-178.4356444235891, 290.03838873980567, 243.88213237756807)  # sum, sum |y|, sum y^2 (float64)


def tiny_fingerprint() -> tuple[str, str, tuple[float, float, float]]:
    cfg = load_preset(PriorConfig, PRESETS, "tiny", ["model.norm_groups=32"]).model
    torch.manual_seed(0)
    model = UNet(cfg).eval()
    state = model.state_dict()
    names = hashlib.sha256(repr([(k, tuple(v.shape)) for k, v in state.items()]).encode()).hexdigest()
    init = hashlib.sha256(b"".join(v.numpy().tobytes() for v in state.values())).hexdigest()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k in sorted(state):  # every weight random, the zero-initialised output convs included
            state[k].copy_(torch.randn(state[k].shape, generator=g) * 0.2)
        z = torch.randn(2, 4, 8, 8, generator=g)
        c = torch.randn(2, 7, cfg.context_dim, generator=g)
        mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
        y = model(z, torch.tensor([10.0, 737.5]), c, mask).double()
    return names, init, (y.sum().item(), y.abs().sum().item(), (y**2).sum().item())


def test_tiny_preset_network_is_unchanged():
    names, init, out = tiny_fingerprint()
    assert names == TINY_NAMES_SHA256 and init == TINY_INIT_SHA256
    assert out == pytest.approx(TINY_OUT, rel=1e-5)


@pytest.mark.slow
def test_stable_diffusion_1_5_full_layout_equals_diffusers():
    """SD 1.5's whole UNet (860M random parameters, ~3.4 GB once: ours shares diffusers' tensors) at a 16x16 latent."""
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**SD15).eval()
    cfg = config_from_diffusers(dict(theirs.config), "SD 1.5", attention="sdpa")
    assert cfg == replace(
        load_preset(PriorConfig, PRESETS, "base").model, attention="sdpa", gradient_checkpointing=False
    )
    with torch.device("meta"):  # no initialisation of weights about to be replaced
        ours = UNet(cfg)
    ours.load_state_dict(from_diffusers(theirs.state_dict(), cfg), assign=True)
    ours.eval()
    z, t, c = inputs(cfg.context_dim, side=16, batch=1, tokens=77)
    with torch.no_grad():
        want = theirs(z, t, encoder_hidden_states=c).sample
        got = ours(z, t, c)
    assert want.abs().max() > 0.1
    assert (got - want).abs().max() <= 1e-5
