"""`latentdiff train prior --init RUN` (#26): a new run from another prior's weights, checked like a resume,
the source recorded; and the fine-tuning knobs (noise offset, the 8-bit optimizer) each through its config field."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from latentdiff.core import checkpoint as ckpt
from latentdiff.core.config import apply_overrides
from latentdiff.core.errors import UserError
from latentdiff.core.runs import read_config
from latentdiff.core.train import TrainConfig, make_optimizer
from latentdiff.prior.config import PriorConfig
from latentdiff.prior.stage import main as prior_main
from latentdiff.prior.stage import offset_noise
from latentdiff.text.model import build_clip, load_model_config
from tests.helpers import cli_exit_2, write_text_run

TINY = ["--batch-size", "4", "--set", "sampling.steps=2", "--set", "sampling.per_prompt=1", "--lr", "1e-5"]


def test_init_starts_from_the_sources_ema_weights_and_records_it(prior_run, data, tmp_path):
    source = prior_run[0]
    out = tmp_path / "tuned"
    # Neither --autoencoder nor --text: the source's own. A runtime [model] field and a [diffusion] knob may change.
    prior_main(["--data", str(data), "--init", str(source), "--out", str(out), "--steps", "1", *TINY,
                "--set", "model.gradient_checkpointing=true", "--set", "diffusion.noise_offset=0.05"])  # fmt: skip
    meta, source_meta = ckpt.read_meta(out, "prior"), ckpt.read_meta(source, "prior")
    assert meta["init"]["path"] == str(source.resolve()) and meta["init"]["step"] == 3
    assert meta["init"]["weights"] == "ema" and len(meta["init"]["hash"]) == 16
    assert meta["autoencoder"] == {**source_meta["autoencoder"], "from_run": meta["autoencoder"]["from_run"]}
    assert meta["text"]["hash"] == source_meta["text"]["hash"] and "lora" not in meta
    cfg, source_cfg = read_config(out, PriorConfig), read_config(source, PriorConfig)
    assert cfg.model == apply_overrides(source_cfg, ["model.gradient_checkpointing=true"]).model
    assert cfg.diffusion.noise_offset == 0.05 and cfg.diffusion.schedule == source_cfg.diffusion.schedule
    # One step at lr 1e-5 from the source's EMA weights: every tensor still within a hair of the source's.
    tuned, start = (
        load_file(str(ckpt.committed_file(out, ckpt.MODEL))),
        load_file(str(ckpt.committed_file(source, ckpt.EMA))),
    )
    assert tuned.keys() == start.keys()
    assert max((tuned[k] - start[k]).abs().max().item() for k in start) < 1e-3
    assert any(not torch.equal(tuned[k], start[k]) for k in start)


def test_init_refuses_another_latent_space_text_encoder_or_model(prior_run, data, other_ae_run, tmp_path, capsys):
    common = ["train", "prior", "--data", str(data), "--init", str(prior_run[0]), "--steps", "1", *TINY]
    err = cli_exit_2(capsys, [*common, "--autoencoder", str(other_ae_run), "--out", str(tmp_path / "a")])
    assert err.count("\n") == 1 and "another latent space" in err
    torch.manual_seed(123)
    other = write_text_run(tmp_path / "other_text", build_clip(load_model_config("clip-tiny")))
    err = cli_exit_2(capsys, [*common, "--text", str(other), "--out", str(tmp_path / "b")])
    assert err.count("\n") == 1 and "text encoder" in err and "hash" in err
    err = cli_exit_2(capsys, [*common, "--set", "model.channels=[8, 16]", "--out", str(tmp_path / "c")])
    assert err.count("\n") == 1 and "model.channels" in err and "leave out --preset and --set model.*" in err
    err = cli_exit_2(capsys, [*common, "--out", str(tmp_path / "d"), "--preset", "base"])
    assert err.count("\n") == 1 and "differs from the one asked for" in err
    err = cli_exit_2(capsys, ["train", "prior", "--init", str(tmp_path / "nowhere"), "--out", str(tmp_path / "e")])
    assert err.count("\n") == 1 and "no such prior run" in err
    assert not any((tmp_path / x).exists() for x in "abcde")


def test_offset_noise_is_one_draw_per_sample_and_channel():
    z = torch.zeros(256, 4, 8, 8)
    torch.manual_seed(0)
    plain = offset_noise(z, 0.0)
    torch.manual_seed(0)
    assert torch.equal(plain, torch.randn_like(z))  # offset 0 draws what training always drew
    torch.manual_seed(0)
    shifted = offset_noise(z, 0.5)
    extra = shifted - plain  # the same first draw, then the offset
    per_map = extra.flatten(2)
    assert torch.allclose(per_map, per_map[..., :1].expand_as(per_map), atol=1e-6)  # constant over H, W
    std = per_map[..., 0].std().item()
    assert 0.45 < std < 0.55  # offset * N(0, 1) per (sample, channel): 1024 draws


def test_adamw8bit_is_bitsandbytes_or_refused_in_one_line(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))]
    cfg = TrainConfig(optimizer="adamw8bit")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(UserError, match="pip install bitsandbytes") as e:
        make_optimizer(params, cfg)
    assert "\n" not in str(e.value)

    class AdamW8bit(torch.optim.AdamW):  # stands in for bitsandbytes.optim.AdamW8bit
        pass

    fake = types.SimpleNamespace(optim=types.SimpleNamespace(AdamW8bit=AdamW8bit))
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    opt = make_optimizer(params, cfg, lr=0.25)
    assert type(opt) is AdamW8bit and [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
    assert [g["peak_lr"] for g in opt.param_groups] == [0.25, 0.25]
    assert type(make_optimizer(params, TrainConfig())) is torch.optim.AdamW
    with pytest.raises(Exception, match="optimizer"):
        apply_overrides(PriorConfig(), ['train.optimizer="sgd"'])
