"""model.context_positions (learned token-index embeddings on the text states the cross-attention reads) and
model.context_layers (text layers the prior trains before it cross-attends)."""

from __future__ import annotations

import pytest
import torch

from latentdiff.prior.interchange import export_problems
from latentdiff.prior.pipeline import TextToImage
from latentdiff.prior.stage import main as prior_main
from latentdiff.prior.unet import UNet, UNetConfig
from latentdiff.text.sources import load_text_encoder
from tests.helpers import PRIOR_ARGS

CFG = UNetConfig(
    in_channels=4, channels=(16, 32), num_res_blocks=1, attention_levels=(1,), heads=2, context_dim=8, norm_groups=8
)


def _inputs(tokens: int = 5):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10.0, 700.0])
    context = torch.randn(2, tokens, 8, generator=g)
    return z, t, context


def _randomised(model: UNet) -> UNet:
    """Every weight random (the output conv and the embeddings start at zero and would hide the text)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@torch.no_grad()
def test_positions_start_at_zero_and_make_the_cross_attention_read_order():
    z, t, context = _inputs()
    shuffled = context[:, [3, 0, 4, 2, 1]]
    plain = _randomised(UNet(CFG))
    # Cross-attention without positions is a function of the set of tokens: any order, the same output.
    torch.testing.assert_close(plain(z, t, shuffled), plain(z, t, context))

    torch.manual_seed(0)
    fresh = UNet(UNetConfig(**{**CFG.__dict__, "context_positions": 6}))
    assert fresh.context_position.shape == (6, 8) and not fresh.context_position.any()
    positioned = UNet(UNetConfig(**{**CFG.__dict__, "context_positions": 6})).eval()
    positioned.load_state_dict({**plain.state_dict(), "context_position": torch.zeros(6, 8)})
    torch.testing.assert_close(positioned(z, t, context), plain(z, t, context))  # zero: the same function

    positioned.context_position.copy_(torch.randn(6, 8, generator=torch.Generator().manual_seed(2)))
    moved = (positioned(z, t, shuffled) - positioned(z, t, context)).abs().max()
    assert moved > 1e-3  # with positions the order of the words changes the prediction


def test_a_text_longer_than_the_positions_is_refused():
    model = UNet(UNetConfig(**{**CFG.__dict__, "context_positions": 4}))
    z, t, context = _inputs(tokens=5)
    with pytest.raises(ValueError, match="5 tokens .* positions of 4 .*model.context_positions"):
        model(z, t, context)


def test_context_positions_are_not_exportable():
    problems = export_problems(UNetConfig(**{**CFG.__dict__, "context_positions": 6}))
    assert any("model.context_positions = 6" in p for p in problems)
    assert not any("context_positions" in p for p in export_problems(CFG))


def test_a_prior_with_positions_trains_loads_and_refuses_too_few(data, ae_run, text_run, tmp_path, capsys):
    common = ["--data", str(data), "--autoencoder", str(ae_run[0]), "--text", str(text_run[0]), "--steps", "3"]
    tokens = load_text_encoder(text_run[0]).context_length
    with pytest.raises(SystemExit):
        prior_main([*common, "--out", str(tmp_path / "few"), *PRIOR_ARGS, "--set", "model.context_positions=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"gives {tokens}; --set model.context_positions={tokens}")
    out = tmp_path / "positioned"
    positions = ["--set", f"model.context_positions={tokens}", "--set", "train.warmup_steps=0"]
    prior_main([*common, "--out", str(out), *PRIOR_ARGS, *positions])
    pipe = TextToImage.from_run(out, device="cpu")
    assert pipe.unet.context_position.shape == (tokens, pipe.unet.cfg.context_dim)
    # Off zero by step 3: the output conv and the transformers' proj_out start at zero, so the gradient reaches
    # the positions from the third step on.
    assert pipe.unet.context_position.abs().sum() > 0
    images = pipe(["a red square"], n=1, steps=2, seed=0)
    assert images.shape[0] == 1 and torch.isfinite(images).all()


@torch.no_grad()
def test_context_layers_start_as_the_identity_and_then_mix_the_words_but_not_the_masked_ones():
    z, t, context = _inputs()
    mask = torch.tensor([[True, True, True, True, False]] * 2)
    plain = _randomised(UNet(CFG))
    torch.manual_seed(0)
    layered = UNet(UNetConfig(**{**CFG.__dict__, "context_layers": 2})).eval()
    layered.load_state_dict(plain.state_dict(), strict=False)  # the text layers as built: zero residuals
    torch.testing.assert_close(layered(z, t, context, mask), plain(z, t, context, mask))

    g = torch.Generator().manual_seed(3)
    for layer in layered.context_layers:
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    states = context.clone()
    for layer in layered.context_layers:
        states = layer(states, mask)
    other_word, masked_word = context.clone(), context.clone()
    other_word[:, 3] += torch.randn(2, 8, generator=g)  # not a constant shift: LayerNorm would remove it
    masked_word[:, 4] += torch.randn(2, 8, generator=g)
    after_other, after_masked = other_word, masked_word
    for layer in layered.context_layers:
        after_other, after_masked = layer(after_other, mask), layer(after_masked, mask)
    assert (after_other[:, 0] - states[:, 0]).abs().max() > 1e-3  # word 0 takes in word 3
    torch.testing.assert_close(after_masked[:, :4], states[:, :4])  # a masked token is read by no word


def test_context_layers_need_heads_that_divide_the_text_width_and_are_not_exportable():
    with pytest.raises(Exception, match="context_layers .* 2 heads, which do not divide context_dim 7"):
        UNetConfig(**{**CFG.__dict__, "context_dim": 7, "context_layers": 1})
    assert any(
        "model.context_layers = 1" in p for p in export_problems(UNetConfig(**{**CFG.__dict__, "context_layers": 1}))
    )
