"""`latentdiff export pipeline RUN --out DIR`: a prior run and its stages as a diffusers SD pipeline folder."""

from __future__ import annotations

import argparse

from latentdiff.core.errors import cli_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latentdiff export pipeline",
        description="Write a prior run with the autoencoder and text encoder it records as the folder diffusers' "
        "StableDiffusionPipeline.from_pretrained reads (unet/, vae/, text_encoder/, tokenizer/, scheduler/); "
        "each part must be one diffusers can build (SD's layouts).",
    )
    p.add_argument("run", help="prior run directory (trained or imported)")
    p.add_argument("--out", required=True, help="folder to write (with --single-file: NAME.safetensors)")
    p.add_argument(
        "--single-file",
        action="store_true",
        help="write one safetensors checkpoint in SD's single-file layout (ComfyUI, AUTOMATIC1111) instead of a "
        "folder; only for Stable Diffusion's scaled_linear schedule, which such a file assumes",
    )
    p.add_argument("--no-ema", action="store_true", help="write the raw weights instead of the EMA ones")
    p.add_argument(
        "--decoder",
        help="a `latentdiff train decoder` run to write as the VAE's decoder (it must have the autoencoder's "
        "decoder architecture)",
    )
    from latentdiff.prior.pipeline import add_lora_argument

    add_lora_argument(p)  # merged into the exported UNet
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with cli_errors():
        from latentdiff.prior.pipeline import TextToImage, lora_arguments
        from latentdiff.prior.sd_export import CLIP_SAMPLE_BACK, write_diffusers_pipeline, write_single_file

        pipe = TextToImage.from_run(
            args.run,
            device="cpu",
            ema=not args.no_ema,
            precision="fp32",
            decoder=args.decoder,
            loras=lora_arguments(args),
        )
        summary = (write_single_file if args.single_file else write_diffusers_pipeline)(pipe, args.out)
        decoder = "" if summary["decoder"] == "autoencoder" else f", the VAE decoding with {summary['decoder']}"
        print(
            f"exported {args.run} to {summary['out']} (scaling_factor={summary['scaling_factor']:.6g}{decoder}); "
            f"`latentdiff generate --sampler ddim --spacing {summary['spacing']}` makes diffusers' DDIM images"
        )
        if summary["clip_sample"] is not None:
            print(
                f"note: the prior clips z_0 to +-{summary['clip_sample']:.4g} while sampling; diffusers' "
                f"StableDiffusionPipeline turns the scheduler's clip_sample off: after loading, {CLIP_SAMPLE_BACK}"
            )
        return summary


if __name__ == "__main__":
    main()
