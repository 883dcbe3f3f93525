"""LoRA fine-tuning of a prior (#26): only the adapters train and are saved, the file's names and merge formula,
an exact resume after SIGKILL, gradient checkpointing and bf16 with adapters, and the one-line refusals.

The LoRA runs start (--init) from the session's tiny prior run (tests/conftest.py); the diffusers round trip
is in test_lora_diffusers.py.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from latentdiff.core import checkpoint as ckpt
from latentdiff.core.errors import UserError
from latentdiff.prior.config import LoraConfig
from latentdiff.prior.init import load_prior
from latentdiff.prior.lora import add_adapters, kohya_namer, merge, parse_lora, read_lora_file, target_names
from latentdiff.prior.parameters import read_png
from latentdiff.prior.pipeline import TextToImage
from latentdiff.prior.stage import main as prior_main
from latentdiff.prior.unet import UNet, UNetConfig
from tests.helpers import PRIOR_ARGS, RESUME_LR, assert_same_weights, cli_exit_2, run_killed_child

pytest.importorskip("peft")

# Every target kind, a learning rate that moves B off zero in two steps, no EMA warm-up surprises.
LORA_ARGS = [
    "--set", "lora.rank=4", "--set", "lora.alpha=2.0", "--set", 'lora.targets=["attn", "ff", "conv"]',
    "--set", "lora.lr=0.01", "--set", "train.ema_decay=0.5", "--set", "train.warmup_steps=0",
    "--set", "train.log_every=1",
]  # fmt: skip


def lora_argv(data: Path, init: Path, out: Path, steps: int, *extra: str) -> list[str]:
    tiny = ["--batch-size", "4", "--set", "sampling.steps=2", "--set", "sampling.per_prompt=1"]
    return [
        "--data",
        str(data),
        "--init",
        str(init),
        "--out",
        str(out),
        "--steps",
        str(steps),
        *tiny,
        *LORA_ARGS,
        *extra,
    ]


@pytest.fixture(scope="module")
def lora_run(prior_run, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "run"
    summary = prior_main(lora_argv(data, prior_run[0], out, 2))
    assert summary["lora_file"] == str(out / "lora.safetensors")
    return out


def test_a_lora_run_saves_and_changes_only_adapters(lora_run, prior_run):
    base = load_file(str(ckpt.committed_file(prior_run[0], ckpt.EMA)))
    for name in (ckpt.MODEL, ckpt.EMA):
        saved = load_file(str(ckpt.committed_file(lora_run, name)))
        assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved), name
    adapters = load_file(str(ckpt.committed_file(lora_run, ckpt.EMA)))
    ups = [v for k, v in adapters.items() if k.endswith("lora_B.weight")]
    assert all(u.abs().max() > 0 for u in ups)  # every B moved off its zero start
    meta = ckpt.read_meta(lora_run, "prior")
    assert meta["lora"] == {"rank": 4, "alpha": 2.0, "targets": ["attn", "ff", "conv"]}
    assert meta["init"]["path"] == str(prior_run[0].resolve()) and meta["init"]["weights"] == "ema"
    assert meta["init"]["step"] == 3 and meta["init"]["hash"]
    # The run's UNet is the base with the adapters merged: every other tensor is the base's, bit for bit.
    merged = load_prior(lora_run).model.state_dict()
    adapted = {m.removesuffix(".lora_A.weight") + ".weight" for m in adapters if m.endswith(".lora_A.weight")}
    assert sorted(merged) == sorted(base)
    assert all(torch.equal(merged[k], base[k]) for k in base if k not in adapted)
    assert all(not torch.equal(merged[k], base[k]) for k in adapted)
    assert ckpt.read_meta(prior_run[0])["step"] == 3  # the source is untouched


def test_merged_weights_are_base_plus_scale_alpha_over_rank_b_a(lora_run, prior_run):
    file = lora_run / "lora.safetensors"
    base = TextToImage.from_run(prior_run[0], device="cpu").unet.state_dict()
    merged = TextToImage.from_run(prior_run[0], device="cpu", loras=[(file, 0.7)]).unet.state_dict()
    tensors = load_file(str(file))
    cfg = load_prior(prior_run[0]).config.model
    name, checked = kohya_namer(cfg), 0
    for module in target_names(UNet(cfg), ("attn", "ff", "conv")):
        key = name(module)
        down, up, alpha = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"], tensors[f"{key}.alpha"]
        rank = down.shape[0]
        # B A by hand: sum over r of up[o, r] * down[r, i, ...] (a conv's up is (out, r, 1, 1))
        delta = torch.einsum("or,r...->o...", up.flatten(1), down)
        expected = base[module + ".weight"] + 0.7 * (alpha / rank) * delta
        torch.testing.assert_close(merged[module + ".weight"], expected, rtol=1e-6, atol=1e-7)
        checked += 1
    assert checked == len({k.split(".")[0] for k in tensors}) > 10
    assert float(alpha) == 2.0 and rank == 4


def test_the_file_has_kohya_names_and_our_header(lora_run):
    file = lora_run / "lora.safetensors"
    keys = set(load_file(str(file)))
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in keys
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj.alpha" in keys
    assert "lora_unet_up_blocks_0_resnets_0_conv_shortcut.lora_down.weight" in keys
    assert all(
        k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys
    )
    with safe_open(str(file), "pt") as f:
        header = f.metadata()
    assert header["latentdiff.rank"] == "4" and header["latentdiff.alpha"] == "2"
    assert header["latentdiff.targets"] == "attn,ff,conv" and header["latentdiff.source_run"] == lora_run.resolve().name
    assert str(lora_run.parent) not in " ".join(header.values())  # no path of the maker's disk in a shared file
    assert header["ss_network_dim"] == "4" and header["latentdiff.weights"] == "ema"


def test_export_lora_writes_the_raw_weights_and_generate_takes_lora(lora_run, prior_run, tmp_path, capsys):
    from latentdiff.scripts import cli

    out = tmp_path / "raw.safetensors"
    cli.main(["export", "lora", str(lora_run), "--out", str(out), "--no-ema"])
    raw, trained = load_file(str(out)), load_file(str(ckpt.committed_file(lora_run, ckpt.MODEL)))
    assert len(raw) == 3 * len(trained) // 2  # down, up, alpha per layer
    ema_file = load_file(str(lora_run / "lora.safetensors"))
    assert any(not torch.equal(raw[k], ema_file[k]) for k in raw if k.endswith("weight"))
    # `generate --lora FILE:SCALE` stacks: two halves make one whole.
    common = ["generate", "a red circle", "--run", str(prior_run[0]), "--n", "1", "--seed", "1", "--steps", "2"]
    # Two steps move the adapters a little: a large scale makes the difference show in 8-bit pixels.
    cli.main([*common, "--out", str(tmp_path / "one"), "--lora", f"{out}:40"])
    cli.main([*common, "--out", str(tmp_path / "halves"), "--lora", f"{out}:20", "--lora", f"{out}:20"])
    cli.main([*common, "--out", str(tmp_path / "none")])
    pngs = {d: sorted((tmp_path / d).rglob("*.png")) for d in ("one", "halves", "none")}
    from PIL import Image

    def pixels(d):
        return torch.from_numpy(np.asarray(Image.open(pngs[d][0]), dtype=np.float32))

    assert (pixels("one") - pixels("halves")).abs().max() <= 1  # the same merged weights, up to float rounding
    # The PNG records the LoRA: --from-png merges it again and remakes the image exactly.
    cli.main(["generate", "--from-png", str(pngs["one"][0]), "--out", str(tmp_path / "again")])
    again = sorted((tmp_path / "again").rglob("*.png"))[0]
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(pngs["one"][0])))
    assert f"--lora {out.resolve()}:40.0" in read_png(pngs["one"][0])[1]["command"]
    assert (pixels("one") - pixels("none")).abs().max() >= 4  # (8 when written; the tiny runs barely decode)


def test_lora_refusals_are_one_line(prior_run, data, lora_run, tmp_path, capsys, monkeypatch):
    common = ["train", "prior", "--data", str(data), "--steps", "1", *PRIOR_ARGS, "--set", "lora.rank=4"]
    ae, text = ckpt.read_meta(prior_run[0])["autoencoder"]["path"], ckpt.read_meta(prior_run[0])["text"]["source"]
    err = cli_exit_2(capsys, [*common, "--autoencoder", ae, "--text", text, "--out", str(tmp_path / "b")])
    assert err.count("\n") == 1 and "lora.rank > 0 trains adapters on a trained prior: pass --init RUN" in err
    assert not (tmp_path / "b").exists()
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    err = cli_exit_2(capsys, [*common, "--init", str(prior_run[0]), "--out", str(tmp_path / "c")])
    assert err.count("\n") == 1 and "pip install peft" in err
    err = cli_exit_2(capsys, ["export", "lora", str(prior_run[0]), "--out", str(tmp_path / "d.safetensors")])
    assert err.count("\n") == 1 and "is not a LoRA run" in err
    err = cli_exit_2(capsys, ["generate", "x", "--run", str(prior_run[0]), "--lora", "f.safetensors:big"])
    assert err.count("\n") == 1 and "must be a number" in err
    err = cli_exit_2(capsys, ["generate", "x", "--run", str(prior_run[0]), "--lora", str(tmp_path / "no")])
    assert err.count("\n") == 1 and "does not exist" in err
    assert parse_lora("a/b.safetensors") == ("a/b.safetensors", 1.0) and parse_lora("c:/x.safetensors:2") == (
        "c:/x.safetensors",
        2.0,
    )


def test_a_lora_file_for_another_unet_is_refused(lora_run, tmp_path):
    fewer = UNetConfig(channels=(16, 32), num_res_blocks=1, context_dim=32, heads=2, attention_levels=(0,))
    with pytest.raises(UserError, match="names no layer of this prior's UNet"):
        read_lora_file(lora_run / "lora.safetensors", fewer)
    cfg = load_prior(lora_run).config.model
    narrower = UNetConfig(**{**vars(cfg), "channels": (8, 16)})  # the same names, other shapes
    with pytest.raises(UserError, match="it was trained on another model"):
        merge(UNet(narrower), read_lora_file(lora_run / "lora.safetensors", narrower), 1.0, "the file")
    with_text = {**load_file(str(lora_run / "lora.safetensors")), "lora_te_text_model_x.alpha": torch.tensor(1.0)}
    save_file(with_text, str(tmp_path / "te.safetensors"))
    with pytest.raises(UserError, match="is a text-encoder LoRA layer, which latentdiff does not apply"):
        read_lora_file(tmp_path / "te.safetensors", cfg)


def test_adapter_lr_is_lora_lr(lora_run):
    lines = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    lrs = {round(line["lr"], 12) for line in lines if "lr" in line}
    assert lrs == {0.01}  # lora.lr, constant, not train.lr


# ---------------------------------------------------------------- the network with adapters


def tiny_unet_with_adapters(checkpointing: bool, seed: int = 0):
    torch.manual_seed(seed)
    unet = UNet(UNetConfig(channels=(16, 32), num_res_blocks=1, context_dim=32, heads=2,
                           gradient_checkpointing=checkpointing))  # fmt: skip
    with torch.no_grad():  # off the zero-initialised output convolutions, so the output and its gradients are not 0
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    adapters = add_adapters(unet, LoraConfig(rank=2, targets=("attn", "ff", "conv"), dropout=0.1))
    with torch.no_grad():
        for k, p in adapters.named_parameters():
            if "lora_B" in k:
                p.normal_(0, 0.1)  # B off zero, so the gradients of A flow
    return unet.train(), adapters


def _grads(checkpointing: bool, autocast: bool) -> dict[str, torch.Tensor]:
    unet, adapters = tiny_unet_with_adapters(checkpointing)
    g = torch.Generator().manual_seed(1)
    z, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    torch.manual_seed(2)  # the adapters' dropout draws
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = unet(z, torch.tensor([10.0, 500.0]), c, None)
    out.float().square().mean().backward()
    assert all(p.grad is None for n, p in unet.named_parameters() if "lora_" not in n)  # the base is frozen
    return {k: p.grad.clone() for k, p in adapters.named_parameters()}


def test_gradient_checkpointing_and_bf16_work_with_adapters():
    plain, checkpointed = _grads(False, False), _grads(True, False)
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    assert all(g.abs().max() > 0 for k, g in plain.items() if "lora_A" in k)  # every adapter takes a gradient
    for k in plain:  # recomputation replays the same dropout masks: the same gradients
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-4, atol=1e-6)
    bf16 = _grads(True, True)
    assert all(torch.isfinite(g).all() for g in bf16.values())
    assert all(g.abs().max() > 0 for k, g in bf16.items() if "lora_A" in k)


# ---------------------------------------------------------------- SIGKILL and resume


def _run_child(argv: list[str], kill_at: int | None) -> int:
    return run_killed_child(prior_main, argv, kill_at)


def test_sigkill_and_resume_with_lora_equals_the_straight_run(prior_run, data, tmp_path):
    extra = [*RESUME_LR, "--set", "train.ckpt_every=1", "--set", "lora.dropout=0.2"]
    straight = tmp_path / "straight"
    prior_main(lora_argv(data, prior_run[0], straight, 4, *extra))
    run, kills = tmp_path / "killed", 0
    # Kill points inside the steps and inside the saves; each try resumes from the newest complete checkpoint.
    for kill_at in (9, 14, 20, None):
        argv = ["--resume", str(run)] if ckpt.has_checkpoint(run) else lora_argv(data, prior_run[0], run, 4, *extra)
        code = _run_child(argv, kill_at)
        if code == 0:
            break
        assert code == -signal.SIGKILL
        kills += 1
    if not (run / "summary.json").exists():
        assert prior_main(["--resume", str(run)])["steps"] == 4
    assert kills >= 2
    assert_same_weights(straight, run, ckpt.MODEL)
    assert_same_weights(straight, run, ckpt.EMA)
    assert load_file(str(straight / "lora.safetensors")).keys() == load_file(str(run / "lora.safetensors")).keys()


def test_a_lora_run_generates_as_its_base_with_its_adapters(lora_run, prior_run):
    """`generate --run LORA_RUN` (and its sample grids' commands, --checkpoint STEP) load the base plus the adapters."""
    merged = TextToImage.from_run(lora_run, device="cpu", checkpoint=2)
    by_file = TextToImage.from_run(prior_run[0], device="cpu", loras=[(lora_run / "lora.safetensors", 1.0)])
    a, b = merged.unet.state_dict(), by_file.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert merged.latent_space == by_file.latent_space
