"""`latentdiff import pipeline SRC --out DIR`: Stable Diffusion 1.x/2.x as autoencoder, text and prior runs."""

from __future__ import annotations

import argparse

from latentdiff.core.errors import cli_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latentdiff import pipeline",
        description="Turn a diffusers StableDiffusionPipeline folder or an SD 1.x/2.x single-file checkpoint into "
        "three runs, DIR/autoencoder, DIR/text and DIR/prior, that `generate`, `evaluate`, `serve` and "
        "`train decoder` read (`latentdiff generate PROMPT --run DIR/prior`). Nothing is downloaded.",
    )
    p.add_argument(
        "src",
        help="a pipeline folder (model_index.json, unet/, text_encoder/, tokenizer/, vae/, scheduler/) or a "
        ".safetensors checkpoint (a pickle such as .ckpt only if torch.load(weights_only=True) reads it)",
    )
    p.add_argument("--out", required=True, help="folder to create the three runs in")
    p.add_argument(
        "--data",
        required=True,
        help="image shards on which the autoencoder's latent std and range are measured, as `import autoencoder` does",
    )
    p.add_argument(
        "--prediction",
        choices=["eps", "v"],
        help="single file only: what the UNet predicts (default eps for SD 1.x; SD 2.x needs it: eps for "
        "2.x-base, v for 768-v); a folder's scheduler_config.json says it",
    )
    p.add_argument(
        "--resolution",
        type=int,
        help="image side (default: a folder's unet sample_size times the VAE's downsampling; a file: 512, 768 for v)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="images per batch when measuring (default: %(default)s)")
    p.add_argument("--batches", type=int, default=4, help="batches to measure on (default: %(default)s)")
    p.add_argument("--device", help="device to measure on (default: cuda if available, else cpu)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with cli_errors():
        from latentdiff.core.runtime import Runtime
        from latentdiff.prior.sd_import import import_pipeline

        rt = Runtime.setup(0, "fp32", args.device)
        rt.announce(args.device)
        summary = import_pipeline(
            args.src,
            args.out,
            args.data,
            prediction=args.prediction,
            resolution=args.resolution,
            batch_size=args.batch_size,
            batches=args.batches,
            device=rt.device,
        )
        print(
            f"imported {args.src} ({summary['format']}, SD {summary['family'][-1]}.x) into {summary['out']}/"
            f"{{autoencoder,text,prior}}: {summary['unet_parameters'] / 1e6:.1f}M UNet parameters, "
            f"{summary['prediction']} prediction, text layer {summary['text_layer']}, "
            f"scale_factor={summary['scale_factor']:.6g}, resolution {summary['resolution']}; "
            f"generate with `latentdiff generate PROMPT --run {summary['out']}/prior`"
        )
        return summary


if __name__ == "__main__":
    main()
