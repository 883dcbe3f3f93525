"""The speed-ups keep the answers: cut text padding, bf16 sampling, the sampling precision choice."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from latentdiff.core.runtime import sampling_dtype
from latentdiff.prior.text_conditioning import guided_conditioning, text_conditioning
from latentdiff.text.encoder import TextEncoder


@pytest.fixture(scope="module")
def to_end(pipe) -> TextEncoder:
    """The pipe's text encoder with the mask up to EOT (encoder.attend = "to_end", the tiny preset's before
    2026-12-06, which runs trained then keep): positions after every prompt's EOT are masked, so they may be cut."""
    e = pipe.encoder
    return TextEncoder(e.model, e.tokenizer, e.model_config, settings=replace(e.settings, attend="to_end")).frozen()


def test_tiny_preset_attends_to_every_position(pipe):
    out = text_conditioning(pipe.encoder, ["a red circle", ""])
    assert pipe.encoder.settings.attend == "all" and out[1].all() and out[0].shape[1] == pipe.encoder.context_length


def test_cut_padding_leaves_the_unet_output_unchanged(pipe, to_end):
    prompts = ["a red circle", "a small blue square at the top left", ""]
    short = text_conditioning(to_end, prompts)
    full = text_conditioning(to_end, prompts, length=to_end.context_length)
    lengths = full[1].sum(dim=1)
    assert short[0].shape[1] == int(lengths.max()) < full[0].shape[1]  # cut after the longest prompt
    assert torch.equal(short[1].sum(dim=1), lengths)  # no real token lost
    z = torch.randn(3, *pipe.latent_shape)
    t = torch.tensor([10.0, 500.0, 990.0])
    with torch.no_grad():
        a = pipe.unet(z, t, short[0], short[1], short[2])
        b = pipe.unet(z, t, full[0], full[1], full[2])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_guided_halves_share_one_length(to_end):
    cond, uncond = guided_conditioning(to_end, ["a large green triangle at the bottom"] * 2, ["", ""])
    assert cond[0].shape == uncond[0].shape and cond[1].shape == uncond[1].shape
    assert uncond[1].sum(dim=1).tolist() == [2, 2]  # "" is SOT, EOT


def test_sampling_precision_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert sampling_dtype(cpu, "fp32") is None and sampling_dtype(cpu, "bf16") is torch.bfloat16
    assert sampling_dtype(cuda, "auto") is torch.bfloat16
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    # by the device alone, never by the rows per pass: an image must not change with its batch
    assert sampling_dtype(cpu, "auto") is (torch.bfloat16 if amx else None)
    with pytest.raises(ValueError, match="fp16"):
        sampling_dtype(cpu, "fp16")


def test_bf16_sampling_stays_close_to_fp32(pipe):
    kw = dict(n=2, steps=4, sampler="dpmpp-2m", guidance=3.0, seed=0)
    pipe.precision = "fp32"
    ref = pipe(["a red circle", "a blue square"], **kw)
    pipe.precision = "bf16"
    try:
        fast = pipe(["a red circle", "a blue square"], **kw)
        assert (
            pipe.settings(["x"], n=1, steps=None, sampler=None, guidance=None, negative_prompt="", seed=0).precision
            == "bf16"
        )
    finally:
        pipe.precision = "auto"
    assert fast.dtype == torch.float32 and fast.shape == ref.shape
    assert not torch.equal(fast, ref)  # bf16 really ran
    assert (fast - ref).abs().mean() < 0.02  # images in [-1, 1]


def test_sampling_conditioning_does_not_depend_on_the_other_prompts_of_its_batch(text_run):
    """guided_conditioning encodes each distinct prompt alone: a prompt's row is the same, bit for bit, in
    any batch and through a warm cache (an image remade alone must equal itself made in a batch)."""
    from latentdiff.text.sources import load_text_encoder

    encoder = load_text_encoder(text_run[0]).frozen(cache_size=64)
    prompt = "a small red circle on the left"
    others = ["a large blue square", "a green triangle at the top", "", "a yellow star"]
    encoder.encode(others + [prompt])  # the cache now holds the prompt as a batch of five made it
    cond, uncond = guided_conditioning(encoder, [*others, prompt, prompt], [""] * 6)
    cond_alone, uncond_alone = guided_conditioning(load_text_encoder(text_run[0]), [prompt], [""])
    for batched, alone in ((cond, cond_alone), (uncond, uncond_alone)):
        for row in (4, 5):
            assert torch.equal(batched[0][row], alone[0][0]) and torch.equal(batched[2][row], alone[2][0])
            assert torch.equal(batched[1][row], alone[1][0])
