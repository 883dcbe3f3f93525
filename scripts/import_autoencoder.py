"""`latentdiff import autoencoder SRC --out RUN`: a pretrained KL autoencoder as a latentdiff autoencoder run."""

from __future__ import annotations

import argparse

from latentdiff.core.errors import cli_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latentdiff import autoencoder",
        description="Turn a diffusers AutoencoderKL folder or a Stable Diffusion / LDM checkpoint file into an "
        "autoencoder run that `train prior`, `train decoder`, `evaluate-autoencoder` and `generate` read.",
    )
    p.add_argument(
        "src",
        help="a diffusers model (or pipeline) folder (full-precision, variant such as fp16, or sharded weights), "
        "or a .safetensors checkpoint whose autoencoder is under first_stage_model.; a pickle (.ckpt, .pt, .bin) "
        "only if torch.load(weights_only=True) reads it",
    )
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument(
        "--scale",
        choices=["source", "data"],
        default="source",
        help="latent scale: the source's scaling_factor (or --scaling-factor), or 1/std measured on --data "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--scaling-factor",
        type=float,
        help="the latent scale, for a file that records none (0.18215 for Stable Diffusion 1.x/2.x's VAE)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="training shards: the latent std and range are measured on them, "
        "as a trained autoencoder run measures its own",
    )
    p.add_argument(
        "--resolution", type=int, help="image side later stages train at (default: the source's sample_size, else 256)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per batch when measuring (default: %(default)s)")
    p.add_argument("--batches", type=int, default=16, help="batches to measure on (default: %(default)s)")
    p.add_argument(
        "--variant",
        help="the diffusers weights variant to read, e.g. fp16 for diffusion_pytorch_model.fp16.safetensors "
        "(default: the full-precision file, else the only variant in the folder)",
    )
    p.add_argument("--device", help="device to measure on (default: cuda if available, else cpu)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with cli_errors():
        from latentdiff.autoencoder.interchange import import_autoencoder
        from latentdiff.core.runtime import Runtime

        rt = Runtime.setup(0, "fp32", args.device)
        rt.announce(args.device)
        device = rt.device
        summary = import_autoencoder(
            args.src,
            args.out,
            args.data,
            scale=args.scale,
            scaling_factor=args.scaling_factor,
            resolution=args.resolution,
            batch_size=args.batch_size,
            batches=args.batches,
            device=device,
            variant=args.variant,
        )
        files = ", ".join(summary["weights"]) if len(summary["weights"]) <= 2 else f"{len(summary['weights'])} shards"
        notes = "".join(f"; {note}" for note in summary["notes"])
        print(
            f"imported {args.src} ({summary['format']}, {files}) into {summary['run']}: "
            f"scale_factor={summary['scale_factor']:.6g} (from {summary['scale_from']}), "
            f"f={summary['downsampling']}, c={summary['latent_channels']}, resolution {summary['resolution']}{notes}"
        )
        return summary


if __name__ == "__main__":
    main()
