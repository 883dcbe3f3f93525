"""Model step: forward + backward + AdamW time, peak memory and achieved FLOP/s per attention backend.

Rows: the prior's UNet and the autoencoder at a preset's batch size, for each attention backend
(sdpa, math, xformers; a backend that cannot run here is listed with the reason). Each row runs
in a fresh process, so its peak memory is its own: on CPU the growth of the process's peak
resident memory over the step (activations, gradients, optimizer state), on CUDA
torch.cuda.max_memory_allocated. FLOPs per step are counted once with torch's FlopCounterMode
(matmuls and convolutions, forward and backward) and divided by the median step time.

On CPU the tiny presets run in fp32; on a GPU the script also runs the base presets in bf16.
The UNet's inputs are random latents, timesteps and text states of the preset's shapes: the
text encoder is not part of this figure (latent_vs_pixel includes it).

`--set KEY=VALUE` changes the prior preset as `latentdiff train prior --set` does, to time a change
against the preset on the same machine, one run after the other:

    python -m bench.model_step --backends sdpa --set 'model.attention_levels=[0, 1]' --out runs/bench/att01.json
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp

import torch

from latentdiff.core.blocks import xformers_available

from .common import device, optimizer_step, parser, peak_rss_mb, report, rss_mb, sync, table, time_it

BACKENDS = ("sdpa", "math", "xformers")


def prior_config(preset: str, overrides: tuple[str, ...] = ()):
    """The prior preset with `--set` overrides applied (ConfigError on a bad one)."""
    from latentdiff.core.config import apply_overrides, load_preset
    from latentdiff.prior.config import PriorConfig
    from latentdiff.prior.stage import PRESETS

    return apply_overrides(load_preset(PriorConfig, PRESETS, preset), overrides)


def prior_step(preset: str, backend: str, precision: str, dev: torch.device, overrides: tuple[str, ...] = ()):
    from latentdiff.autoencoder import stage as autoencoder_stage
    from latentdiff.autoencoder.model import AutoencoderConfig
    from latentdiff.core.config import load_preset
    from latentdiff.core.runtime import use_deterministic_kernels
    from latentdiff.core.train import make_optimizer
    from latentdiff.prior.config import make_schedule
    from latentdiff.prior.losses import diffusion_loss
    from latentdiff.prior.unet import UNet

    cfg = prior_config(preset, overrides)
    use_deterministic_kernels(cfg.train.deterministic)  # --set train.deterministic=true times them (docs/devices.md)
    unet = UNet(dataclasses.replace(cfg.model, attention=backend)).to(dev)
    opt = make_optimizer(unet.parameters(), cfg.train)
    schedule = make_schedule(cfg.diffusion)
    B = cfg.train.batch_size
    # The latent grid of the autoencoder preset of the same name (tiny: f=4, base: f=8).
    side = cfg.resolution // load_preset(AutoencoderConfig, autoencoder_stage.PRESETS, preset).model.downsampling
    g = torch.Generator(dev).manual_seed(0)
    z0 = torch.randn(B, cfg.model.in_channels, side, side, device=dev, generator=g)
    context = torch.randn(B, 77, cfg.model.context_dim, device=dev, generator=g)
    mask = torch.ones(B, 77, dtype=torch.bool, device=dev)
    mask[:, 12:] = False  # a typical short caption
    pooled = torch.randn(B, cfg.model.pooled_dim, device=dev, generator=g) if cfg.model.pooled_dim else None
    d = cfg.diffusion

    def step():
        t = torch.randint(0, schedule.T, (B,), device=dev, generator=g)
        eps = torch.randn(z0.shape, device=dev, generator=g)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = unet(schedule.q_sample(z0, t, eps), t.float(), context, mask, pooled)
        loss = diffusion_loss(
            out.float(),
            schedule.target(d.prediction, z0, eps, t),
            t,
            schedule,
            d.loss_weighting,
            d.min_snr_gamma,
            d.prediction,
        ).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return unet, step, B


def autoencoder_step(preset: str, backend: str, precision: str, dev: torch.device):
    from latentdiff.autoencoder.losses import AutoencoderLoss
    from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig
    from latentdiff.autoencoder.stage import PRESETS
    from latentdiff.core.config import load_preset
    from latentdiff.core.runtime import Runtime
    from latentdiff.core.train import make_optimizer

    cfg = load_preset(AutoencoderConfig, PRESETS, preset)
    # LPIPS needs downloaded VGG weights and the GAN starts late: time the reconstruction step.
    loss_cfg = dataclasses.replace(cfg.loss, perceptual="none", disc_weight=0.0)
    model = Autoencoder(dataclasses.replace(cfg.model, attention=backend)).to(dev)
    loss_fn = AutoencoderLoss(loss_cfg, cfg.model.in_channels).to(dev)
    opt = make_optimizer(model.parameters(), cfg.train)
    rt = Runtime(dev, precision=precision)
    B = cfg.train.batch_size
    x = torch.rand(B, cfg.model.in_channels, cfg.resolution, cfg.resolution, device=dev) * 2 - 1

    def step():
        with rt.autocast():
            x_hat, posterior = model(x)
            loss = loss_fn(x, x_hat.float(), posterior, 0, model.decoder.last_layer)["loss"].mean()
        optimizer_step(loss, model, opt, cfg.train.grad_clip)

    return model, step, B


MODELS = {"prior UNet": prior_step, "autoencoder": autoencoder_step}


def measure(
    model: str, preset: str, backend: str, precision: str, repeats: int, overrides: tuple[str, ...] = ()
) -> dict:
    """Runs in a fresh process: time, memory and FLOPs of one configuration (overrides: the prior's only)."""
    from torch.utils.flop_counter import FlopCounterMode

    dev = device()
    torch.manual_seed(0)
    extra = (overrides,) if model == "prior UNet" else ()
    net, step, B = MODELS[model](preset, backend, precision, dev, *extra)
    params = sum(p.numel() for p in net.parameters())
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = rss_mb()
    seconds = time_it(step, warmup=1, repeats=repeats, device=dev)
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    else:
        peak = peak_rss_mb() - base
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    sync(dev)
    flops = counter.get_total_flops()
    return {
        "model": model,
        "preset": preset,
        "overrides": list(overrides) if model == "prior UNet" else [],
        "backend": backend,
        "precision": precision,
        "batch_size": B,
        "params": params,
        "seconds": seconds,
        "peak_mb": peak,
        "gflop_per_step": flops / 1e9,
        "tflops": flops / seconds / 1e12,
    }


def unavailable(backend: str, dev: torch.device) -> str | None:
    if backend == "xformers" and not xformers_available(dev.type):
        return "xformers not installed" if not _importable("xformers") else f"xformers does not run on {dev.type}"
    return None


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def main(argv: list[str] | None = None) -> list[dict]:
    p = parser("model_step", __doc__)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per row after one warm-up")
    p.add_argument("--backends", default=",".join(BACKENDS), help="attention backends (default: %(default)s)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the prior preset as `latentdiff train prior --set` does, e.g. 'model.attention_levels=[0, 1]'",
    )
    args = p.parse_args(argv)
    overrides = tuple(args.set)

    dev = device()
    configs = [("tiny", "fp32")] + ([("base", "bf16")] if dev.type == "cuda" else [])
    from latentdiff.core.config import ConfigError

    for preset, _ in configs:  # a bad key or value: the config's one-line error, before any process starts
        try:
            prior_config(preset, overrides)
        except ConfigError as e:
            p.error(f"prior preset {preset}: {e}")
    results, rows = [], []
    ctx = mp.get_context("spawn")
    for preset, precision in configs:
        for model in MODELS:
            # The tiny autoencoder has no attention layer: one row says so instead of three equal ones.
            backends = args.backends.split(",") if model == "prior UNet" or preset != "tiny" else ["sdpa"]
            for backend in backends:
                why = unavailable(backend, dev)
                if why:
                    rows.append([model, preset, backend, precision, "", "", "", "", "", f"n/a: {why}"])
                    results.append({"model": model, "preset": preset, "backend": backend, "unavailable": why})
                    continue
                with ctx.Pool(1) as pool:
                    r = pool.apply(measure, (model, preset, backend, precision, args.repeats, overrides))
                results.append(r)
                shown = "(none in the tiny preset)" if model == "autoencoder" and preset == "tiny" else backend
                rows.append(
                    [
                        model,
                        " ".join([preset, *r["overrides"]]),
                        shown,
                        precision,
                        r["batch_size"],
                        f"{r['params'] / 1e6:.2f}M",
                        f"{r['seconds'] * 1000:.0f}",
                        f"{r['batch_size'] / r['seconds']:.0f}",
                        f"{r['peak_mb']:.0f}",
                        f"{r['gflop_per_step']:.1f} GFLOP, {1000 * r['tflops']:.0f} GFLOP/s",
                    ]
                )
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
    memory = "peak CUDA memory" if dev.type == "cuda" else "peak RSS growth"
    text = table(
        [
            "model",
            "preset",
            "attention",
            "precision",
            "batch",
            "params",
            "ms/step",
            "images/s",
            f"{memory} (MB)",
            "FLOPs / achieved",
        ],
        rows,
    )
    text += f"\n\nMedian of {args.repeats} steps of forward + loss + backward + AdamW, each row in a fresh process."
    report(
        "model_step", "5. Model step: time, memory and FLOP/s per attention backend", text, {"rows": results}, args.out
    )
    return results


if __name__ == "__main__":
    main()
