"""`latentdiff export lora RUN --out FILE.safetensors`: a LoRA run's adapters as the file diffusers and ComfyUI load."""

from __future__ import annotations

import argparse

from latentdiff.core.errors import cli_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latentdiff export lora",
        description="Write the adapters of a LoRA prior run (lora.rank > 0) as a safetensors file with kohya / "
        "diffusers-SD keys (lora_unet_...lora_down.weight, .lora_up.weight, .alpha), which diffusers' "
        "load_lora_weights, ComfyUI and `latentdiff generate --lora` read. Training writes RUN/lora.safetensors "
        "itself; this writes another checkpoint's or the raw weights.",
    )
    p.add_argument("run", help="LoRA prior run directory")
    p.add_argument("--out", required=True, help="file to write (FILE.safetensors)")
    p.add_argument("--no-ema", action="store_true", help="the raw adapters instead of their EMA")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="the checkpoint of this step (default: the newest)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with cli_errors():
        from latentdiff.prior.lora import export_lora

        summary = export_lora(args.run, args.out, ema=not args.no_ema, checkpoint=args.checkpoint)
        print(
            f"exported the {summary['layers']} adapters of {args.run} (step {summary['step']}, rank "
            f"{summary['rank']}, {summary['weights']} weights) to {summary['out']} ({summary['bytes']:,} bytes)"
        )
        return summary


if __name__ == "__main__":
    main()
