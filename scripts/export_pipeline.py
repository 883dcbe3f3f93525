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
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--no-ema", action="store_true", help="write the raw weights instead of the EMA ones")
    from latentdiff.prior.pipeline import add_lora_argument

    add_lora_argument(p)  # merged into the exported UNet
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with cli_errors():
        from latentdiff.prior.pipeline import TextToImage, lora_arguments
        from latentdiff.prior.sd_export import write_diffusers_pipeline

        loras = lora_arguments(args)
        pipe = TextToImage.from_run(args.run, device="cpu", ema=not args.no_ema, precision="fp32", loras=loras)
        summary = write_diffusers_pipeline(pipe, args.out)
        print(f"exported {args.run} to {summary['out']} (scaling_factor={summary['scaling_factor']:.6g})")
        if summary["note"]:
            print(f"note: {summary['note']}")
        return summary


if __name__ == "__main__":
    main()
