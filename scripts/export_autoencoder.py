"""`latentdiff export autoencoder RUN --out DIR`: an autoencoder run as a diffusers AutoencoderKL model folder."""

from __future__ import annotations

import argparse

from latentdiff.core.errors import cli_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latentdiff export autoencoder",
        description="Write an autoencoder run as config.json + diffusion_pytorch_model.safetensors, the folder "
        "diffusers' AutoencoderKL.from_pretrained reads (its architecture must be LDM's layout).",
    )
    p.add_argument("run", help="autoencoder run directory (trained or imported)")
    p.add_argument("--out", required=True, help="folder to write")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with cli_errors():
        from latentdiff.autoencoder.interchange import export_autoencoder

        summary = export_autoencoder(args.run, args.out)
        print(
            f"exported {args.run} to {summary['out']} ({summary['tensors']} tensors, "
            f"scaling_factor={summary['scaling_factor']:.6g})"
        )
        return summary


if __name__ == "__main__":
    main()
