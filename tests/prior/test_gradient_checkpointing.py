"""Gradient checkpointing is off in every preset (the base prior's memory fits a GPU without it: see its comment
and docs/prior.md), and turning it on with --set model.gradient_checkpointing=true changes memory, not results."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from latentdiff.core.config import load_toml
from latentdiff.prior.config import PriorConfig
from latentdiff.prior.unet import UNet, UNetConfig

PRESETS = sorted((Path(__file__).parents[2] / "prior" / "presets").glob("*.toml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_leave_gradient_checkpointing_off(preset):
    assert load_toml(PriorConfig, preset).model.gradient_checkpointing is False


def test_checkpointing_gives_the_same_loss_and_gradients():
    cfg = UNetConfig(channels=(16, 32), num_res_blocks=1, attention_levels=(1,), heads=2, context_dim=8)
    torch.manual_seed(0)
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    context, mask = torch.randn(2, 5, 8), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    grads = {}
    for on in (False, True):
        torch.manual_seed(1)
        net = UNet(dataclasses.replace(cfg, gradient_checkpointing=on)).train()
        torch.nn.init.normal_(net.conv_out.weight)  # zero-initialised: its gradient would hide everything before it
        loss = net(z, t, context, mask).square().mean()
        loss.backward()
        grads[on] = (loss.detach(), {n: p.grad for n, p in net.named_parameters()})
    assert torch.equal(grads[True][0], grads[False][0])
    for name, g in grads[False][1].items():
        torch.testing.assert_close(grads[True][1][name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for n, g in grads[True][1].items() if n.startswith("down"))
