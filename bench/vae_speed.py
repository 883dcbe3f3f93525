"""Autoencoder speed: images/s of encoding (x -> posterior mean) and decoding (z -> x) per image side.

With --run it times that autoencoder run (e.g. Stable Diffusion's VAE after `latentdiff import
autoencoder`); without, the base preset's network, which is Stable Diffusion's VAE architecture
exactly, with its initial weights (the same speed). float32, no gradients. Besides wall-clock
images/s it reports CPU seconds per image (process time over all threads), which other
processes on a shared machine do not inflate.
"""

from __future__ import annotations

import time

import torch

from .common import device, parser, report, table, time_it


def cpu_seconds(fn, calls: int) -> float:
    """Mean CPU time (all threads of this process) per call: what a shared machine does not inflate."""
    t0 = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t0) / calls


def main(argv: list[str] | None = None) -> dict:
    p = parser("vae_speed", __doc__)
    p.add_argument("--run", help="an autoencoder run directory (default: the base preset, initial weights)")
    p.add_argument("--sizes", default="64,256", help="comma-separated image sides (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="images per call (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per figure, after one warm-up")
    args = p.parse_args(argv)

    dev = device()
    if args.run:
        from latentdiff.autoencoder.load import load_autoencoder

        model, _ = load_autoencoder(args.run, dev)
        what = f"run {args.run}"
    else:
        from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig
        from latentdiff.autoencoder.stage import PRESETS
        from latentdiff.core.config import load_preset

        model = Autoencoder(load_preset(AutoencoderConfig, PRESETS, "base").model).to(dev).eval()
        what = "base preset (Stable Diffusion's VAE architecture), initial weights"
    cfg = model.cfg
    params = sum(p.numel() for p in model.parameters()) / 1e6
    rows, figures = [], {"model": what, "parameters_m": params, "batch_size": args.batch_size, "results": []}
    g = torch.Generator(dev).manual_seed(0)
    for side in [int(s) for s in args.sizes.split(",")]:
        x = torch.rand(args.batch_size, cfg.in_channels, side, side, generator=g, device=dev) * 2 - 1
        with torch.no_grad():
            z = model.encode(x).mode()
            enc = time_it(lambda: model.encode(x).mode(), repeats=args.repeats, device=dev)
            dec = time_it(lambda: model.decode(z), repeats=args.repeats, device=dev)
            enc_cpu = cpu_seconds(lambda: model.encode(x).mode(), args.repeats) if dev.type == "cpu" else 0.0
            dec_cpu = cpu_seconds(lambda: model.decode(z), args.repeats) if dev.type == "cpu" else 0.0
        n = args.batch_size
        figures["results"].append(
            {
                "side": side,
                "latent": list(z.shape[1:]),
                "encode_images_per_s": n / enc,
                "decode_images_per_s": n / dec,
                "encode_cpu_s_per_image": enc_cpu / n,
                "decode_cpu_s_per_image": dec_cpu / n,
            }
        )
        rows.append(
            [
                f"{side}x{side}",
                "x".join(str(s) for s in z.shape[1:]),
                f"{n / enc:.2f}",
                f"{n / dec:.2f}",
                f"{enc_cpu / n:.2f}",
                f"{dec_cpu / n:.2f}",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    text = table(
        [
            "image",
            "latent (c x h x w)",
            "encode images/s",
            "decode images/s",
            "encode CPU s/image",
            "decode CPU s/image",
        ],
        rows,
    )
    text += (
        f"\n\n{what}; {params:.1f}M parameters; float32, batch {args.batch_size}, "
        f"median of {args.repeats} calls after a warm-up."
    )
    report("vae_speed", "Autoencoder encode and decode speed", text, figures, args.out)
    return figures


if __name__ == "__main__":
    main()
