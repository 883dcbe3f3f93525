"""bench.gpu sections 2 and 3: the base prior's training step (images/s, MFU, memory) and SD-1.5-sized generation.

Model FLOP utilisation (MFU, PaLM's definition: Chowdhery et al. 2022, App. B) = model FLOPs per
second over the device's bf16 dense peak (plan.PEAK_BF16_TFLOPS). Model FLOPs of a training
step are 3x the forward's (backward = 2x forward), the forward counted once with
torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention); the recomputation
that gradient checkpointing adds is not model FLOPs, so it lowers MFU as it lowers images/s.
"""

from __future__ import annotations

import dataclasses
import gc
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..common import optimizer_step, sync
from .plan import GOAL_GENERATION_STEPS_S, GOAL_MFU, GOAL_TRAIN_IMAGES_S, Sizes, peak_tflops

TEXT_POSITIONS, CAPTION_TOKENS = 77, 12  # training text states: 77 positions, a typical caption's 12 valid


def peak(dev: torch.device) -> tuple[str, float | None]:
    """(what the peak is, TFLOP/s or None): the table's part for a known CUDA device, else "unknown device"."""
    if dev.type != "cuda":
        return f"unknown device ({dev.type}: no bf16 peak in the table)", None
    name = torch.cuda.get_device_name(dev)
    found = peak_tflops(name)
    return (f"{found[0]}, {found[1]:.0f} TFLOP/s bf16 dense", found[1]) if found else (f"unknown device ({name})", None)


def forward_flops(forward: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward()
    return counter.get_total_flops()


def free(dev: torch.device) -> None:
    """Release the last variant's model, optimizer state and compiled graphs before the next."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()


# ---- 2. the training step ----------------------------------------------------------------------------------


def prior_config(sizes: Sizes, extra: tuple[str, ...] = ()):
    from ..model_step import prior_config as preset_with_overrides

    return preset_with_overrides(sizes.prior_preset, (*sizes.prior_overrides, *extra))


def diffusers_config(model) -> dict:
    """Keyword arguments of the diffusers UNet2DConditionModel that our UNetConfig `model` is (prior.interchange).

    A config diffusers cannot express exactly (the tiny preset's GroupNorms take gcd(32, width) groups) is
    brought to the closest one it can: one group count dividing every width, no pooled embedding.
    """
    import dataclasses
    import math

    from latentdiff.prior import interchange

    if interchange.export_problems(model):
        model = dataclasses.replace(model, norm_groups=math.gcd(model.norm_groups, *model.channels), pooled_dim=0)
    config = interchange.diffusers_config(model, sample_size=0)
    return {k: v for k, v in config.items() if k not in ("_class_name", "sample_size")}


DIFFUSERS = "diffusers UNet2DConditionModel, checkpointing off"


def variants(sizes: Sizes) -> list[tuple[str, tuple[str, ...]]]:
    """(label, prior config overrides) per row; compile last, as it may not finish within the section's limit.

    The switches are the config's (model.gradient_checkpointing, train.channels_last, train.compile),
    applied as the training loop applies them (`as_the_loop_runs_it`).
    """
    off = "model.gradient_checkpointing=false"
    return [
        ("checkpointing on", ("model.gradient_checkpointing=true",)),
        ("checkpointing off (the preset)", (off,)),
        ("checkpointing off, channels_last", (off, "train.channels_last=true")),
        (DIFFUSERS, (off,)),
        ("checkpointing off, compile", (off, "train.compile=true")),
        ("checkpointing off, compile, channels_last", (off, "train.compile=true", "train.channels_last=true")),
    ]


def as_the_loop_runs_it(module: torch.nn.Module, train, backend: str):
    """train.channels_last and train.compile applied as core.train.Run.wrap applies them (one process, no DDP).

    channels_last: the weights in place, 4-d inputs converted on entry by the loop's own pre-hook.
    backend: torch.compile's (the loop uses the default, inductor; the CPU smoke run "eager").
    """
    from latentdiff.core.train import _channels_last_inputs

    if train.channels_last:
        module.to(memory_format=torch.channels_last)
        module.register_forward_pre_hook(_channels_last_inputs)
    return torch.compile(module, backend=backend) if train.compile else module


def build_step(cfg, dev: torch.device, sizes: Sizes, theirs: bool):
    """(the module, its forward for FLOP counting, one training step, batch size) as the prior stage steps.

    Forward under bf16 autocast, the prior's loss, backward, clip, AdamW: random latents, timesteps
    and text states of the preset's shapes (speed does not depend on their values).
    """
    from latentdiff.autoencoder import stage as autoencoder_stage
    from latentdiff.autoencoder.model import AutoencoderConfig
    from latentdiff.core.config import load_preset
    from latentdiff.core.train import make_optimizer
    from latentdiff.prior.config import make_schedule
    from latentdiff.prior.losses import diffusion_loss

    B, d = cfg.train.batch_size, cfg.diffusion
    ae_preset = "base" if sizes.prior_preset == "base" else "tiny"
    side = cfg.resolution // load_preset(AutoencoderConfig, autoencoder_stage.PRESETS, ae_preset).model.downsampling
    g = torch.Generator(dev).manual_seed(0)
    z0 = torch.randn(B, cfg.model.in_channels, side, side, device=dev, generator=g)
    context = torch.randn(B, TEXT_POSITIONS, cfg.model.context_dim, device=dev, generator=g)
    mask = torch.zeros(B, TEXT_POSITIONS, dtype=torch.bool, device=dev)
    mask[:, :CAPTION_TOKENS] = True
    if theirs:
        from diffusers import UNet2DConditionModel

        module = UNet2DConditionModel(sample_size=side, **diffusers_config(cfg.model))

        def call(net, z_t, t):
            return net(z_t, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample

    else:
        from latentdiff.prior.unet import UNet

        module = UNet(cfg.model)

        def call(net, z_t, t):
            return net(z_t, t.float(), context, mask, None)

    module = module.to(dev).train()
    net = as_the_loop_runs_it(module, cfg.train, sizes.compile_backend)
    opt = make_optimizer(module.parameters(), cfg.train)
    schedule = make_schedule(d)
    autocast = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=sizes.precision == "bf16")

    def forward():
        t = torch.randint(0, schedule.T, (B,), device=dev, generator=g)
        with torch.autocast(**autocast):
            return call(module, z0, t)

    def step():
        t = torch.randint(0, schedule.T, (B,), device=dev, generator=g)
        eps = torch.randn(z0.shape, device=dev, generator=g)
        with torch.autocast(**autocast):
            out = call(net, schedule.q_sample(z0, t, eps), t)
        target = schedule.target(d.prediction, z0, eps, t)
        loss = diffusion_loss(out.float(), target, t, schedule, d.loss_weighting, d.min_snr_gamma, d.prediction)
        optimizer_step(loss.mean(), module, opt, cfg.train.grad_clip)

    return module, forward, step, B


def measure_variant(label: str, overrides: tuple[str, ...], sizes: Sizes, flops_of: dict[bool, int]) -> dict:
    """One row of section 2. Its model, optimizer and compiled graph die with this call, even when it raises."""
    dev = torch.device(sizes.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(0)
    theirs = label == DIFFUSERS
    module, forward, step, B = build_step(prior_config(sizes, overrides), dev, sizes, theirs)
    if theirs not in flops_of:  # the forward's FLOPs are the model's, whatever the switches
        flops_of[theirs] = forward_flops(forward)
    t0 = time.perf_counter()
    for _ in range(sizes.train_warmup):
        step()
    sync(dev)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(sizes.train_steps):
        step()
    sync(dev)
    seconds = (time.perf_counter() - t0) / sizes.train_steps
    step_flops = 3 * flops_of[theirs]
    return {
        "variant": label,
        "overrides": list(overrides),
        "params": sum(p.numel() for p in module.parameters()),
        "batch_size": B,
        "seconds_per_step": seconds,
        "images_per_s": B / seconds,
        "warmup_s": warmup_s,
        "model_tflop_per_step": step_flops / 1e12,
        "model_tflops": step_flops / seconds / 1e12,
        "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
    }


def train_step(sizes: Sizes, work: Path, record: Callable[[dict], None], earlier: dict) -> dict:
    """Section 2: each variant's images/s, MFU and peak memory, one after the other in this process."""
    dev = torch.device(sizes.device)
    peak_text, peak_value = peak(dev)
    free(dev)  # what section 1's runs left cached is not this step's memory
    rows, results = [], []
    flops_of: dict[bool, int] = {}  # forward FLOPs per model (ours, diffusers): variants share them
    for label, overrides in variants(sizes):
        try:
            r = measure_variant(label, overrides, sizes, flops_of)
            r["mfu"] = r["model_tflops"] / peak_value if peak_value else None
        except Exception as e:  # an out-of-memory or compile failure is a finding: record it, run the next variant
            traceback.print_exc()
            r = {"variant": label, "overrides": list(overrides), "error": f"{type(e).__name__}: {e}".splitlines()[0]}
        free(dev)
        results.append(r)
        rows.append(_train_row(r))
        print("bench.gpu: " + " | ".join(str(c) for c in rows[-1]), flush=True)
        record({"rows": rows, "figures": {"variants": results}})
    ours = [r for r in results if "error" not in r and r["variant"] != DIFFUSERS]
    best = max(ours, key=lambda r: r["images_per_s"], default=None)
    goals = [
        (
            f"training step >= {GOAL_MFU:.0%} MFU",
            _best_text(best, "mfu"),
            None if best is None or best["mfu"] is None else best["mfu"] >= GOAL_MFU,
        ),
        (
            f"training step >= {GOAL_TRAIN_IMAGES_S:.0f} images/s",
            "no variant ran" if best is None else f"{best['images_per_s']:.0f} images/s ({best['variant']})",
            None if best is None else best["images_per_s"] >= GOAL_TRAIN_IMAGES_S,
        ),
    ]
    cfg = prior_config(sizes)
    return {
        "columns": ["variant", "params", "ms/step", "images/s", "model TFLOP/s", "MFU", "peak memory GiB", "warm-up s"],
        "rows": rows,
        "notes": [
            f"The {sizes.prior_preset} prior preset, batch {cfg.train.batch_size}, {_precision(sizes)}, "
            f"{TEXT_POSITIONS} text positions ({CAPTION_TOKENS} valid): forward, min-SNR loss, backward, clip, AdamW; "
            f"{sizes.train_steps} steps timed back to back after {sizes.train_warmup} (warm-up s: those, compilation "
            f"included). Peak: {peak_text}. A step is counted as 3x the forward's FLOPs (FlopCounterMode). "
            "diffusers' UNet2DConditionModel is built from a config with our widths, res blocks, attention levels, "
            "heads and text width (random weights, diffusers' default attention processor); the params column "
            "compares the two. compile and channels_last are `train.compile` and `train.channels_last`, applied as the "
            f"training loop applies them (torch.compile backend: {sizes.compile_backend})."
        ],
        "figures": {"variants": results, "peak": peak_text, "best_images_per_s": best and best["images_per_s"]},
        "goals": goals,
    }


def _precision(sizes: Sizes) -> str:
    return "bf16 autocast" if sizes.precision == "bf16" else sizes.precision


def _best_text(best: dict | None, key: str) -> str:
    if best is None:
        return "no variant ran"
    if best[key] is None:
        return "n/a: unknown device (no peak to divide by)"
    return f"{best[key]:.1%} ({best['variant']})"


def _train_row(r: dict) -> list:
    if "error" in r:
        return [r["variant"], "", "", "", "", "", "", f"FAILED: {r['error']}"]
    return [
        r["variant"],
        f"{r['params'] / 1e6:.1f}M",
        f"{1000 * r['seconds_per_step']:.1f}",
        f"{r['images_per_s']:.1f}",
        f"{r['model_tflops']:.1f}",
        "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}",
        "n/a (CPU)" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}",
        f"{r['warmup_s']:.1f}",
    ]


# ---- 3. generation ---------------------------------------------------------------------------------------


class Counted(torch.nn.Module):
    """The UNet, counting its calls: a "step" in the figures is one call (over the 2B guided rows)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, *args):
        self.calls += 1
        return self.net(*args)


def sd15_config(sizes: Sizes):
    """Our UNet at SD-1.5's sizes (320 channels, mult 1,2,4,4, 2 res blocks, attention at 3 levels, 8 heads)."""
    from latentdiff.core.config import load_preset
    from latentdiff.prior.config import PriorConfig
    from latentdiff.prior.stage import PRESETS
    from latentdiff.prior.unet import UNetConfig

    cfg = load_preset(PriorConfig, PRESETS, "tiny" if sizes.sd_toy else "base")
    if sizes.sd_toy:
        return cfg, dataclasses.replace(cfg.model, context_dim=sizes.sd_context)
    model = UNetConfig(
        in_channels=4,
        channels=(320, 640, 1280, 1280),
        num_res_blocks=2,
        attention_levels=(0, 1, 2),
        heads=8,
        context_dim=sizes.sd_context,
    )
    return cfg, model


SAMPLER, GUIDANCE = "dpmpp-2m", 5.0  # one network evaluation per step


def measure_generation(unet, cfg, model_cfg, batch: int, compiled: bool, sizes: Sizes) -> dict:
    """One row of section 3; its compiled graph and inputs die with this call, even when it raises."""
    from latentdiff.prior.config import make_schedule
    from latentdiff.prior.latent_sampling import sample_latents

    from ..common import time_it

    dev = next(unet.parameters()).device
    net = Counted(torch.compile(unet, backend=sizes.compile_backend) if compiled else unet)
    g = torch.Generator(dev).manual_seed(0)
    text = torch.randn(batch, sizes.sd_tokens, sizes.sd_context, device=dev, generator=g)
    mask = torch.ones(batch, sizes.sd_tokens, dtype=torch.bool, device=dev)
    cond, uncond = (text, mask, None), (torch.zeros_like(text), mask, None)
    schedule = make_schedule(cfg.diffusion)

    def generate():
        sample_latents(
            net,
            schedule,
            cfg.diffusion.prediction,
            cond,
            uncond,
            (model_cfg.in_channels, sizes.sd_latent, sizes.sd_latent),
            sampler=SAMPLER,
            steps=sizes.generation_steps,
            guidance=GUIDANCE,
            generator=torch.Generator(dev).manual_seed(0),
            clip_x0=None,
            dtype=torch.bfloat16 if sizes.precision == "bf16" else None,
        )

    t0 = time.perf_counter()
    generate()  # warm-up (and compilation)
    sync(dev)
    warmup_s = time.perf_counter() - t0
    net.calls = 0
    seconds = time_it(generate, warmup=0, repeats=sizes.generation_repeats, device=dev)
    calls = net.calls / sizes.generation_repeats
    return {
        "batch_size": batch,
        "compiled": compiled,
        "seconds": seconds,
        "unet_calls": calls,
        "steps_per_s": calls / seconds,
        "images_per_s": batch / seconds,
        "warmup_s": warmup_s,
    }


@torch.inference_mode()
def generation(sizes: Sizes, work: Path, record: Callable[[dict], None], earlier: dict) -> dict:
    """Section 3: guided steps/s of the sampling loop at batch 1 and 8, eager and (batch 1) compiled."""
    from latentdiff.prior.unet import UNet

    dev = torch.device(sizes.device)
    free(dev)
    cfg, model_cfg = sd15_config(sizes)
    unet = UNet(model_cfg).to(dev).eval()
    params = sum(p.numel() for p in unet.parameters())
    runs = [(b, False) for b in sizes.generation_batches] + ([(1, True)] if sizes.generation_compile else [])
    rows, results = [], []
    for batch, compiled in runs:
        label = f"batch {batch}" + (", compiled" if compiled else "")
        try:
            r = {"row": label, **measure_generation(unet, cfg, model_cfg, batch, compiled, sizes)}
        except Exception as e:
            traceback.print_exc()
            r = {
                "row": label,
                "batch_size": batch,
                "compiled": compiled,
                "error": f"{type(e).__name__}: {e}".splitlines()[0],
            }
        free(dev)
        results.append(r)
        rows.append(
            [label, "", "", "", "", f"FAILED: {r['error']}"]
            if "error" in r
            else [label, f"{r['steps_per_s']:.1f}", f"{1000 / r['steps_per_s']:.1f}", f"{r['images_per_s']:.2f}",
                  f"{r['warmup_s']:.1f}", ""]
        )  # fmt: skip
        print("bench.gpu: " + " | ".join(str(c) for c in rows[-1]), flush=True)
        record({"rows": rows, "figures": {"rows": results}})
    at_one = [r for r in results if r["batch_size"] == 1 and "error" not in r]
    best = max(at_one, key=lambda r: r["steps_per_s"], default=None)
    return {
        "columns": ["batch", "steps/s", "ms/step", "images/s", "warm-up s", "error"],
        "rows": rows,
        "notes": [
            ("The tiny preset's UNet (smoke run)" if sizes.sd_toy else "Our UNet at SD-1.5's sizes")
            + f" ({params / 1e6:.0f}M parameters: widths {list(model_cfg.channels)}, "
            f"{model_cfg.num_res_blocks} res blocks, attention at levels {list(model_cfg.attention_levels)}, "
            f"{model_cfg.heads} heads, context {model_cfg.context_dim}) at {sizes.sd_latent}x{sizes.sd_latent}x4 "
            f"latents, random weights, {sizes.sd_tokens} text positions, {_precision(sizes)}; "
            f"{SAMPLER}, {sizes.generation_steps} steps, guidance {GUIDANCE:g}. One step = one UNet call over the "
            "2 x batch rows of the conditional and unconditional halves, plus the solver's update (counted calls "
            "per second); text encoding and decoding are not included. Median of "
            f"{sizes.generation_repeats} calls after one warm-up."
        ],
        "figures": {"rows": results, "params": params},
        "goals": [
            (
                f"generation >= {GOAL_GENERATION_STEPS_S:.0f} steps/s at batch 1",
                "no row ran" if best is None else f"{best['steps_per_s']:.1f} steps/s ({best['row']})",
                None if best is None else best["steps_per_s"] >= GOAL_GENERATION_STEPS_S,
            )
        ],
    }
