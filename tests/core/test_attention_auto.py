"""attention = "auto" means torch's scaled_dot_product_attention (its fused flash / memory-efficient kernels) on
every device, xformers installed or not; xformers runs only when a config asks for it by name."""

from __future__ import annotations

import pytest
import torch

from latentdiff.core import blocks
from latentdiff.core.blocks import Attention, attention


class _LooksLikeCuda(torch.Tensor):
    """A CPU tensor that reports a CUDA device: what the backend choice reads, without a GPU."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0)


@pytest.fixture
def xformers_everywhere(monkeypatch):
    """xformers "installed and working" on every device; calling it fails the test. Returns the SDPA calls."""
    monkeypatch.setattr(blocks, "xformers_available", lambda device_type: True)

    def picked(*args, **kwargs):
        raise AssertionError("attention = 'auto' picked xformers")

    monkeypatch.setattr(blocks, "_xformers_attention", picked)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        calls.append(kwargs.get("attn_mask") is not None)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(blocks.F, "scaled_dot_product_attention", recording)
    return calls


def test_auto_is_sdpa_even_where_xformers_runs(xformers_everywhere):
    q, k, v = (torch.randn(2, 4, n, 8).as_subclass(_LooksLikeCuda) for n in (16, 5, 5))
    assert q.device.type == "cuda"
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False
    out = attention(q, k, v, mask, "auto")
    assert xformers_everywhere == [True]  # one SDPA call, the text mask passed through
    want = attention(*(x.as_subclass(torch.Tensor) for x in (q, k, v)), mask, "math")
    torch.testing.assert_close(out.as_subclass(torch.Tensor), want, rtol=1e-5, atol=1e-6)


def test_an_auto_attention_layer_never_calls_xformers(xformers_everywhere):
    layer = Attention(8, 2, context_dim=6)  # backend "auto", the presets' default
    x, context = torch.randn(2, 16, 8).as_subclass(_LooksLikeCuda), torch.randn(2, 5, 6)
    layer(x, context).sum()
    assert len(xformers_everywhere) == 1


def test_xformers_still_runs_when_asked_for(monkeypatch):
    monkeypatch.setattr(blocks, "xformers_available", lambda device_type: True)
    asked = []
    monkeypatch.setattr(blocks, "_xformers_attention", lambda q, k, v, mask: asked.append(q.shape) or q)
    q = torch.randn(1, 2, 4, 8)
    attention(q, q, q, None, "xformers")
    assert asked == [q.shape]
