"""A LoRA trained here is a LoRA for diffusers (#26): fine-tune an imported SD-style prior with LoRA, export the base
with `export pipeline`, load the run's lora.safetensors with diffusers' `load_lora_weights`: every tensor of the file
lands in a peft layer of diffusers' UNet, and diffusers' image equals `generate --lora`'s (PSNR >= 40 dB, float32).
`export pipeline --lora` merges the file into the exported UNet instead. Random weights; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentdiff.prior.lora import kohya_namer, target_names
from latentdiff.prior.pipeline import TextToImage
from latentdiff.prior.stage import main as prior_main
from latentdiff.prior.unet import UNet
from latentdiff.scripts.export_pipeline import main as export_pipeline_main
from latentdiff.scripts.import_pipeline import main as import_main

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from tests.prior.test_diffusers_equality import OURS, SCHEDULERS, psnr  # noqa: E402
from tests.prior.test_import_pipeline import build_pipeline  # noqa: E402

SCALE = 0.8


@pytest.fixture(autouse=True)
def _no_hub_kernels(monkeypatch):
    monkeypatch.setenv("USE_HUB_KERNELS", "0")  # transformers 5 asks for its `kernels` package otherwise


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, data) -> dict[str, Path]:
    """An imported random SD-1-style pipeline, a 2-step LoRA on it (every target kind), and the base exported."""
    root = tmp_path_factory.mktemp("lora_sd")
    build_pipeline(root / "sd", "sd1")
    import_main([str(root / "sd"), "--out", str(root / "runs"), "--data", str(data), "--batch-size", "2",
                 "--batches", "1"])  # fmt: skip
    prior_main([
        "--data", str(data), "--init", str(root / "runs" / "prior"), "--out", str(root / "lora"), "--steps", "2",
        "--batch-size", "2", "--set", "lora.rank=4", "--set", "lora.alpha=4.0", "--set", "lora.lr=0.05",
        "--set", 'lora.targets=["attn", "ff", "conv"]', "--set", "train.warmup_steps=0",
        "--set", "sampling.steps=2", "--set", "sampling.per_prompt=1",
    ])  # fmt: skip
    export_pipeline_main([str(root / "runs" / "prior"), "--out", str(root / "base_sd")])
    return {"prior": root / "runs" / "prior", "lora": root / "lora", "base_sd": root / "base_sd", "root": root}


def _diffusers(folder: Path):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = SCHEDULERS["ddim"]()  # the walk OURS["ddim"] takes
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _theirs(pipe, **kwargs) -> torch.Tensor:
    return pipe(
        "a red circle", num_inference_steps=8, guidance_scale=7.5, generator=torch.Generator().manual_seed(5),
        output_type="pt", height=32, width=32, **kwargs,
    ).images[0]  # fmt: skip


def _ours(prior: Path, loras) -> torch.Tensor:
    pipe = TextToImage.from_run(prior, device="cpu", precision="fp32", loras=loras)
    image = pipe("a red circle", steps=8, sampler="ddim", guidance=7.5, seed=5, sampler_options=OURS["ddim"])[0]
    return (image + 1) / 2


def test_diffusers_loads_every_tensor_and_makes_the_same_image(tuned):
    file = tuned["lora"] / "lora.safetensors"
    tensors = load_file(str(file))
    pipe = _diffusers(tuned["base_sd"])
    plain = _theirs(pipe)
    pipe.load_lora_weights(str(tuned["lora"]), weight_name="lora.safetensors", adapter_name="ours")
    # Every layer of the file is a peft layer of diffusers' UNet holding the file's A and B: no key was left out.
    loaded = {
        name: module
        for name, module in pipe.unet.named_modules()
        if hasattr(module, "lora_A") and "ours" in getattr(module, "lora_A", {})
    }
    cfg = TextToImage.from_run(tuned["prior"], device="cpu").cfg.model
    kohya = kohya_namer(cfg)
    expected = {kohya(m): m for m in target_names(UNet(cfg), ("attn", "ff", "conv"))}
    assert len(loaded) == len(expected) == len({k.split(".")[0] for k in tensors}) > 20
    for name, module in loaded.items():
        key = "lora_unet_" + name.replace(".", "_")
        assert torch.equal(module.lora_A["ours"].weight, tensors[f"{key}.lora_down.weight"]), name
        assert torch.equal(module.lora_B["ours"].weight, tensors[f"{key}.lora_up.weight"]), name
        assert module.scaling["ours"] == pytest.approx(float(tensors[f"{key}.alpha"]) / 4)
    theirs = _theirs(pipe, cross_attention_kwargs={"scale": SCALE})
    mine = _ours(tuned["prior"], [(file, SCALE)])
    assert theirs.std() > 0.01
    assert psnr(plain, theirs) < 40.0  # the LoRA changes the image: the comparison below can fail
    value = psnr(mine, theirs)
    print(f"PSNR generate --lora vs diffusers' load_lora_weights: {value:.1f} dB (no LoRA: {psnr(plain, theirs):.1f})")
    assert value >= 40.0


def test_export_pipeline_merges_a_lora(tuned):
    file = tuned["lora"] / "lora.safetensors"
    out = tuned["root"] / "merged_sd"
    export_pipeline_main([str(tuned["prior"]), "--out", str(out), "--lora", f"{file}:{SCALE}"])
    theirs = _theirs(_diffusers(out))
    assert psnr(_ours(tuned["prior"], [(file, SCALE)]), theirs) >= 40.0
    assert psnr(_ours(tuned["prior"], []), theirs) < 40.0
