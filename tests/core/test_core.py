"""core/: strict configs, checkpoints, EMA, attention backends, building blocks."""

import math
from dataclasses import dataclass, field

import pytest
import torch

from latentdiff.core import checkpoint as ckpt
from latentdiff.core.blocks import Attention, ResBlock, attention, pad_keys, timestep_embedding, xformers_available
from latentdiff.core.config import ConfigError, apply_overrides, dumps_toml, from_dict, load_toml, to_dict
from latentdiff.core.ema import EMA
from latentdiff.core.image_metrics import PSNR_MAX_DB, psnr, ssim
from latentdiff.core.train import TrainConfig, lr_factor


@dataclass(frozen=True)
class Inner:
    width: int = 8  # a width
    widths: tuple[int, ...] = (1, 2)  # several
    rate: float = 0.5  # a rate


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    flag: bool = False


def test_unknown_key_is_an_error_naming_the_key(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('name = "a"\n[inner]\nwidht = 3\n')
    with pytest.raises(ConfigError, match="widht"):
        load_toml(Outer, path)


def test_types_are_checked_and_coerced():
    cfg = from_dict(Outer, {"inner": {"width": 4, "widths": [3, 4], "rate": 1}})
    assert cfg.inner.widths == (3, 4) and isinstance(cfg.inner.rate, float)
    with pytest.raises(ConfigError, match="inner.width"):
        from_dict(Outer, {"inner": {"width": "wide"}})
    with pytest.raises(ConfigError, match="flag"):
        from_dict(Outer, {"flag": 1})


def test_overrides_and_toml_round_trip(tmp_path):
    cfg = apply_overrides(Outer(), ["inner.width=16", "name=hello", "inner.widths=[5, 6, 7]", "flag=true"])
    assert cfg == Outer(name="hello", inner=Inner(width=16, widths=(5, 6, 7)), flag=True)
    with pytest.raises(ConfigError, match="depth"):
        apply_overrides(cfg, ["inner.depth=2"])
    path = tmp_path / "c.toml"
    path.write_text(dumps_toml(to_dict(cfg)))
    assert load_toml(Outer, path) == cfg


def test_checkpoint_weights_round_trip_and_atomicity(tmp_path):
    block = ResBlock(8, 16, emb_dim=4)
    ckpt.save_weights(tmp_path / "m.safetensors", block.state_dict(), {"step": 3})
    other = ResBlock(8, 16, emb_dim=4)
    other.load_state_dict(ckpt.load_weights(tmp_path / "m.safetensors"))
    x, emb = torch.randn(2, 8, 5, 5), torch.randn(2, 4)
    torch.nn.init.normal_(block.conv2.weight)
    other.conv2.weight.data.copy_(block.conv2.weight.data)
    assert torch.equal(block(x, emb), other(x, emb))
    # A failing writer leaves the previous file intact and no temporary behind.
    before = (tmp_path / "m.safetensors").read_bytes()
    with pytest.raises(RuntimeError):
        ckpt.atomic_write(tmp_path / "m.safetensors", lambda tmp: (_ for _ in ()).throw(RuntimeError("killed")))
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_state_round_trip_with_rng(tmp_path):
    from latentdiff.core.runtime import rng_state, set_rng_state

    state = {"step": 7, "rng": rng_state()}
    ckpt.save_state(tmp_path / "state.pt", state)
    a = torch.rand(3)
    set_rng_state(ckpt.load_state(tmp_path / "state.pt")["rng"])
    assert torch.equal(torch.rand(3), a)


def test_read_meta_checks_the_stage(tmp_path):
    ckpt.write_json(tmp_path / "meta.json", {"stage": "text", "format_version": 1})
    with pytest.raises(ckpt.CheckpointError, match="'text' run, not a 'autoencoder' run"):
        ckpt.read_meta(tmp_path, "autoencoder")
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.read_meta(tmp_path / "nope")


def test_ema_follows_the_formula():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, 0.9, warmup=False)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # first update copies the weights
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    expected = 0.9 * (start + 1) + 0.1 * (start + 2)
    assert torch.allclose(ema.module.weight, expected)


def test_ema_warmup_ramps_the_decay():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, 0.999)
    ema.update(model)  # n = 0: a copy
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # n = 1: decay min(0.999, 2/11)
    assert ema.module.weight.item() == pytest.approx(1 - 2 / 11)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attention_backends_agree_with_a_mask(backend):
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., 4:] = False
    out = attention(q, k, v, mask, backend)
    # reference: masked keys dropped entirely
    ref1 = torch.softmax(q[1] @ k[1, :, :4].transpose(-1, -2) / 8**0.5, -1) @ v[1, :, :4]
    assert torch.allclose(out[1], ref1, atol=1e-5)


@pytest.mark.parametrize("keys", [5, 8, 12])
def test_padding_keys_with_masked_ones_leaves_attention_unchanged(keys):
    """pad_keys (for xformers' multiple-of-8 bias) checked on the SDPA path: the same output, keys a multiple of 8."""
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, keys, 8), torch.randn(2, 3, keys, 8)
    mask = torch.ones(2, 1, 1, keys, dtype=torch.bool)
    mask[1, ..., 3:] = False  # the shorter prompt's padding
    pk, pv, pmask = pad_keys(k, v, mask)
    assert pk.shape[2] == pv.shape[2] == pmask.shape[-1] == 8 * math.ceil(keys / 8)
    assert torch.equal(pk[:, :, :keys], k) and not pmask[..., keys:].any() and torch.equal(pmask[..., :keys], mask)
    torch.testing.assert_close(
        attention(q, pk, pv, pmask, "sdpa"), attention(q, k, v, mask, "sdpa"), rtol=1e-5, atol=1e-6
    )


@pytest.mark.skipif(
    not torch.cuda.is_available() or not xformers_available("cuda"),
    reason="needs CUDA and an xformers that runs there (the text mask's key lengths are checked "
    "against SDPA on the GPU)",
)
@pytest.mark.parametrize("keys", [5, 7, 8, 12])
def test_xformers_takes_text_masks_of_any_length_and_agrees_with_sdpa(keys):
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 32, device="cuda", dtype=torch.float16, generator=g) for n in (64, keys, keys))
    mask = torch.ones(2, 1, 1, keys, dtype=torch.bool, device="cuda")
    mask[1, ..., 4:] = False
    out = attention(q, k, v, mask, "xformers")
    torch.testing.assert_close(out, attention(q, k, v, mask, "sdpa"), rtol=1e-2, atol=1e-2)
    assert torch.equal(attention(q, k, v, mask, "auto"), attention(q, k, v, mask, "sdpa"))  # auto is sdpa here too


def test_asking_for_xformers_where_it_cannot_run_is_a_clear_error():
    q = torch.randn(1, 1, 2, 8)  # CPU tensors: xformers' kernels need CUDA
    with pytest.raises(RuntimeError, match="xformers is not installed or does not run on cpu"):
        attention(q, q, q, None, "xformers")


def test_cross_attention_ignores_masked_context():
    attn = Attention(16, 4, context_dim=6, backend="math")
    x, ctx = torch.randn(1, 9, 16), torch.randn(1, 5, 6)
    mask = torch.tensor([[True, True, True, False, False]])
    ctx2 = ctx.clone()
    ctx2[:, 3:] = 100.0  # changing masked tokens must not change the output
    assert torch.allclose(attn(x, ctx, mask), attn(x, ctx2, mask), atol=1e-6)


def test_timestep_embedding_and_lr_schedule():
    emb = timestep_embedding(torch.tensor([0.0, 10.5, 999.0]), 33)
    assert emb.shape == (3, 33) and torch.isfinite(emb).all()
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, lr_decay="cosine")
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(0.1)


def test_psnr_known_values():
    x = torch.zeros(1, 3, 4, 4)
    assert psnr(x, x + 0.2).item() == pytest.approx(20.0, abs=1e-4)  # MSE 0.01 on the [0,1] scale
    assert psnr(x, x).item() == PSNR_MAX_DB  # MSE 0: capped, not inf
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[:, :1])


def _metric_pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    return x, (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def test_psnr_and_ssim_keep_the_figures_of_the_hand_written_versions():
    # What the hand-written PSNR and SSIM (core/image_metrics.py and evaluation/reconstruction.py at
    # commit 7a2f856) gave on this input: `git show 7a2f856:evaluation/reconstruction.py`, run on _metric_pair().
    x, y = _metric_pair()
    assert psnr(y, x).tolist() == pytest.approx([17.211397171, 17.134489059, 17.307600021, 17.241096497], rel=1e-6)
    assert ssim(y, x).tolist() == pytest.approx([0.8918959498, 0.8873307109, 0.8932412267, 0.8890211583], rel=1e-6)


def test_psnr_and_ssim_are_torchmetrics_per_image():
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    x, y = _metric_pair()
    x01, y01 = (x + 1) / 2, (y + 1) / 2
    for i in range(len(x)):
        assert psnr(y[i : i + 1], x[i : i + 1]).item() == pytest.approx(
            peak_signal_noise_ratio(y01[i], x01[i], data_range=1.0).item(), rel=1e-6
        )
    # torchmetrics averages the SSIM map over the reflection-padded whole image; ours over the valid
    # region (Wang et al.'s reference code), where the 11x11 window lies inside the image: 5 px in from the edge.
    _, full = structural_similarity_index_measure(
        y01.double(), x01.double(), data_range=1.0, reduction="none", return_full_image=True
    )
    torch.testing.assert_close(ssim(y, x), full[..., 5:-5, 5:-5].flatten(1).mean(1).float())
    assert not torch.allclose(ssim(y, x), full.flatten(1).mean(1).float())
    assert torch.equal(ssim(x, x), torch.ones(4))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :10, :10], y[..., :10, :10])
